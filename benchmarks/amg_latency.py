"""Automatic mask generation: our `SamAutomaticMaskGenerator.generate` vs the official one, same
process, same image, same (random) weights.

    python benchmarks/amg_latency.py [--configs tiny,vit_b] [--runs 2]

Configs (one row each):

  * ``tiny``: the parity test's setting (tests/sam/test_amg.py): the tiny SAM with weights at
    `randomize_` gain 3, a 120x160 image, 16 x 16 points in batches of 48, pred_iou_thresh 1,
    stability_score_thresh 0.3, box_nms_thresh 0.99 (tens of masks survive).
  * ``tiny-crops``: the same model with crop_n_layers=1 (five crops), 480x640 image.
  * ``vit_b``: vit_b-shaped SAM, every weight random (gain 1), a 480x640 image, the official
    defaults (32 x 32 points, batches of 64). Random weights give junk scores, so few masks
    pass the filters: this row times the model and postprocessing, not mask bookkeeping.

Each side runs once untimed (JAX: compile + run, reported as "first call"), then `--runs` timed
calls (median). Prints a markdown table with ours/official (lower is better for ours). Needs
the `test` extra (torch, segment-anything).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import host_setup, machine_line, median_time, table

CONFIGS = {
    "tiny": dict(
        model="tiny",
        gain=3.0,
        seed=3,
        image_hw=(120, 160),
        kwargs=dict(
            points_per_side=16,
            points_per_batch=48,
            pred_iou_thresh=1.0,
            stability_score_thresh=0.3,
            box_nms_thresh=0.99,
        ),
    ),
    "tiny-crops": dict(
        model="tiny",
        gain=3.0,
        seed=3,
        image_hw=(480, 640),
        kwargs=dict(
            points_per_side=16,
            points_per_batch=64,
            pred_iou_thresh=1.0,
            stability_score_thresh=0.3,
            box_nms_thresh=0.99,
            crop_n_layers=1,
        ),
    ),
    "vit_b": dict(model="vit_b", gain=1.0, seed=0, image_hw=(480, 640), kwargs={}),
}


def _image(hw: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field (blocks of 16 px, bilinear-upsampled), HxWx3 uint8."""
    from PIL import Image

    rng = np.random.RandomState(0)
    small = rng.randint(0, 255, (hw[0] // 16 + 1, hw[1] // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((hw[1], hw[0]), Image.BILINEAR))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,tiny-crops,vit_b", help="comma-separated rows")
    ap.add_argument("--runs", type=int, default=2, help="timed calls per side (median)")
    args = ap.parse_args()
    host_setup()

    import jax
    import jax.numpy as jnp
    import torch

    from samref_jax.sam.automatic_mask_generator import SamAutomaticMaskGenerator
    from samref_jax.sam.build import SamModel
    from samref_jax.sam.config import sam_config
    from samref_jax.sam.convert import convert_state_dict
    from tests.sam_reference import build_torch_sam, randomize_, segment_anything, state_dict_numpy

    rows = []
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        cfg = sam_config(spec["model"])
        ts = randomize_(build_torch_sam(cfg), spec["seed"], spec["gain"]).requires_grad_(False)
        _, params = convert_state_dict(state_dict_numpy(ts), config=cfg)
        sam = SamModel(cfg, jax.tree_util.tree_map(jnp.asarray, params))
        image = _image(spec["image_hw"])
        official = segment_anything.SamAutomaticMaskGenerator(ts, **spec["kwargs"])
        ours = SamAutomaticMaskGenerator(sam, **spec["kwargs"])

        t0 = time.perf_counter()
        ref = official.generate(image)
        official_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = ours.generate(image)
        ours_first = time.perf_counter() - t0
        t_official, _ = median_time(lambda: official.generate(image), args.runs, warmup=0)  # noqa: B023
        t_ours, _ = median_time(lambda: ours.generate(image), args.runs, warmup=0)  # noqa: B023
        crops = len(ours.crop_boxes(image.shape[:2])[0])
        rows.append(
            [
                f"{name}: {cfg.name} {image.shape[0]}x{image.shape[1]}, "
                f"{ours.num_batches(image.shape[:2])} batches, {crops} crop(s)",
                f"{len(ref)} / {len(got)}",
                f"{official_first:.2f} s / {ours_first:.2f} s",
                f"{t_official:.2f} s",
                f"{t_ours:.2f} s",
                f"**{t_ours / t_official:.2f}**",
            ]
        )
        print(rows[-1], flush=True)
    print(machine_line(), f"torch_threads={torch.get_num_threads()}")
    headers = [
        "config",
        "masks official / ours",
        "first call official / ours",
        "official (median)",
        "ours (median)",
        "ours/official",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
