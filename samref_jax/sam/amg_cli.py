"""``samref amg``: automatic mask generation for images or folders of images.

    samref amg --checkpoint tiny --image photo.jpg --out out/amg --points-per-side 16

For each image, writes ``OUT/<image name>/NNN.png`` (one 0/255 PNG per mask, the image's
size, in the generator's order) and ``OUT/<image name>/masks.json``: the image's path and
size, the generator settings, and one record per mask (the official record without the full
mask: ``file``, ``area``, ``bbox`` XYWH, ``predicted_iou``, ``point_coords``,
``stability_score``, ``crop_box`` XYWH, plus ``segmentation`` as an uncompressed or COCO RLE
with ``--rle``). Prints the path of each ``masks.json``; a progress bar over prompt batches
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["configure", "run"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")
_RLE_MODES = {"none": "binary_mask", "uncompressed": "uncompressed_rle", "coco": "coco_rle"}


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def configure(p: argparse.ArgumentParser) -> None:
    """Adds the ``amg`` arguments (the official generator's options, dashed)."""
    from samref_jax.cli import DEFAULT_CHECKPOINT

    p.add_argument(
        "--image",
        action="append",
        default=[],
        required=True,
        metavar="PATH",
        help="an image file, or a folder whose images (not sub-folders) are all processed; "
        "repeat for more",
    )
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help="checkpoint directory (SAM-REF or converted SAM; its SAM part is used) or bundled "
        f"name (default: {DEFAULT_CHECKPOINT})",
    )
    g = p.add_argument_group("generator options (the official SamAutomaticMaskGenerator's)")
    options = [
        ("--points-per-side", _int_at_least(1), 32, "grid points along each side (N x N)"),
        ("--points-per-batch", _int_at_least(1), 64, "prompts per jitted model call"),
        ("--pred-iou-thresh", float, 0.88, "keep masks with predicted IoU above this"),
        ("--stability-score-thresh", float, 0.95, "keep masks with stability at least this"),
        ("--stability-score-offset", float, 1.0, "logit offset of the stability score"),
        ("--box-nms-thresh", float, 0.7, "box IoU above which a lower-IoU mask is dropped"),
        ("--crop-n-layers", _int_at_least(0), 0, "crop layers (layer i: (2**i)**2 crops)"),
        ("--crop-nms-thresh", float, 0.7, "box NMS threshold between crops"),
        ("--crop-overlap-ratio", float, 512 / 1500, "overlap of first-layer crops"),
        ("--crop-n-points-downscale-factor", _int_at_least(1), 1, "grid shrink per layer"),
        ("--min-mask-region-area", _int_at_least(0), 0, "fill holes / drop islands below"),
    ]
    for flag, kind, default, text in options:
        g.add_argument(
            flag,
            type=kind,
            default=default,
            metavar="X" if kind is float else "N",
            help=f"{text} (default: {default:.4g})",
        )
    p.add_argument(
        "--rle",
        choices=sorted(_RLE_MODES),
        default="none",
        help="also store each mask in masks.json as an uncompressed or COCO RLE (default: none)",
    )


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "points_per_side",
        "points_per_batch",
        "pred_iou_thresh",
        "stability_score_thresh",
        "stability_score_offset",
        "box_nms_thresh",
        "crop_n_layers",
        "crop_nms_thresh",
        "crop_overlap_ratio",
        "crop_n_points_downscale_factor",
        "min_mask_region_area",
    )
    return {k: getattr(args, k) for k in keys}


def list_images(specs: list[str]) -> list[Path]:
    """The image files named by ``--image`` (files as given, folders' images sorted by name)."""
    from samref_jax.cli import CliError

    images: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise CliError(
                    f"no images in folder {p} (looked for {', '.join(IMAGE_SUFFIXES)} files)"
                )
            images += found
        elif p.exists():
            images.append(p)
        else:
            raise CliError(f"image not found: {p}")
    names: dict[str, Path] = {}
    for img in images:
        if img.stem in names and names[img.stem] != img:
            raise CliError(
                f"two images would write to the same output folder {img.stem!r}: "
                f"{names[img.stem]} and {img}"
            )
        names[img.stem] = img
    return list(dict.fromkeys(images))


def run(args: argparse.Namespace) -> int:
    """Runs ``samref amg``; returns the exit status."""
    from samref_jax.cli import CliError, check_out_folder, read_image_or_fail
    from samref_jax.loading import LoadError, check_checkpoint, short_reason

    images = list_images(args.image)
    out = check_out_folder(args.out)
    check_checkpoint(args.checkpoint)
    settings = _settings(args)
    output_mode = _RLE_MODES[args.rle]

    from tqdm import tqdm

    from samref_jax import viz
    from samref_jax.checkpoint import CheckpointError
    from samref_jax.sam import amg
    from samref_jax.sam.automatic_mask_generator import SamAutomaticMaskGenerator
    from samref_jax.sam.build import load_sam

    try:
        sam = load_sam(args.checkpoint)
    except CheckpointError as e:
        raise LoadError(f"cannot load checkpoint {args.checkpoint}: {short_reason(e)}") from None
    try:
        # Binary masks for the PNGs; the RLE of --rle is computed from them.
        SamAutomaticMaskGenerator.check_output_mode(output_mode)
        generator = SamAutomaticMaskGenerator(sam, **settings)
    except (ValueError, ImportError) as e:
        raise CliError(str(e)) from None

    with tqdm(total=0, unit="batch", desc="samref amg", file=sys.stderr, disable=None) as bar:
        for path in images:
            image = read_image_or_fail(path)
            h, w = image.shape[:2]
            bar.total += generator.num_batches((h, w))
            bar.refresh()
            try:
                records = generator.generate(image, progress=bar.update)
            except ValueError as e:  # e.g. an image too small for the model's frame
                raise CliError(f"{path}: {e}") from None
            folder = out / path.stem
            index = []
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for i, rec in enumerate(records):
                    name = f"{i:03d}.png"
                    mask = rec.pop("segmentation")
                    viz.mask_image(mask).save(folder / name)
                    if args.rle == "uncompressed":
                        rec["segmentation"] = amg.mask_to_rle(mask)
                    elif args.rle == "coco":
                        rec["segmentation"] = amg.coco_encode_rle(mask)
                    index.append({"file": name, **rec})
                doc = {
                    "image": str(path),
                    "height": h,
                    "width": w,
                    "checkpoint": str(args.checkpoint),
                    "settings": {**settings, "output_mode": output_mode},
                    "masks": index,
                }
                (folder / "masks.json").write_text(json.dumps(doc, indent=1) + "\n")
            except OSError as e:
                raise CliError(f"cannot write to --out {out}: {e.strerror or e}") from None
            bar.write(f"samref amg: {len(records)} masks for {path} ({w}x{h})", file=sys.stderr)
            print(folder / "masks.json", flush=True)
    return 0
