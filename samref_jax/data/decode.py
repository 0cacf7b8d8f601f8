"""Decoding shared by the folder readers and the TFDS builders (Pillow only, no OpenCV).

Ground truth is ``int8[H, W]``: ``1`` object, ``0`` background, ``-1`` ignore. The per-dataset
mask rules follow RITM's loaders (docs/design.md, 'Datasets'), which read masks with
``cv2.imread`` (BGR order):

- GrabCut, Berkeley: first cv2 channel (blue; the masks are greyscale so every channel is the
  same): ``128`` ignore, ``> 128`` object, else background.
- DAVIS: maximum over the colour channels ``> 0`` is object.
- COCO_MVal: ``255`` object, else background (the shipped masks hold only 0 and 255).
- SBD: ``GTinst.Segmentation`` from ``inst/*.mat``; each non-zero id is one instance.
- PascalVOC: ``SegmentationObject`` palette indices; each id is one instance and the boundary
  (index 255, or grey 220 when the PNG was saved as RGB, RITM's convention) is ignore.

Images are decoded to ``uint8[H, W, 3]`` RGB by :func:`read_image`, the one reader of the
command line, the evaluator, the demo and ``samref_jax.read_image``: greyscale, palette, RGBA and
CMYK converted (alpha dropped); 16-bit and float images scaled like the array API does
(``samref_jax.sam.predictor.as_rgb_uint8``); EXIF orientation applied (as ``cv2.imread``, which
RITM's loaders use, does; masks are read without it). No benchmark image carries an orientation
tag.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from samref_jax.paths import as_path

__all__ = [
    "DataError",
    "IGNORE",
    "binary_gt",
    "check_same_size",
    "instance_gt",
    "read_image",
    "read_mask_channels",
    "read_semantic_mask",
    "read_sbd_instances",
    "read_voc_instances",
]

IGNORE = -1


class DataError(ValueError):
    """A dataset file is missing, unmatched or malformed; the message names the file."""


def _open(path: str | Path) -> Image.Image:
    path = as_path(path)  # epath: local or gs://...
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with path.open("rb") as fh:
            im = Image.open(fh)
            im.load()
    except OSError as e:
        raise DataError(f"cannot decode {path}: {e}") from e
    return im


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to ``uint8[H, W, 3]`` RGB, upright (EXIF orientation applied).

    16-bit images are scaled by 1/257 and float images (values in [0, 1]) by 255, exactly as
    the array API (``as_rgb_uint8``) scales such arrays; other values raise :class:`DataError`.
    """
    from PIL import ImageOps

    im = _open(path)
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as e:  # a malformed EXIF block: say so rather than guess
        raise DataError(f"cannot decode {path}: bad EXIF orientation data ({e})") from None
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float samples
        arr = np.asarray(im)
        if arr.dtype.kind in "iu":
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise DataError(f"cannot decode {path}: {im.mode} image values outside 0..65535")
            arr = arr.astype(np.uint16)
        from samref_jax.sam.transforms import as_rgb_uint8

        try:
            return as_rgb_uint8(arr)
        except ValueError as e:
            raise DataError(f"cannot decode {path}: {im.mode} image: {e}") from None
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def read_mask_channels(path: str | Path) -> np.ndarray:
    """Decode a mask file to ``uint8[H, W, C]`` the way ``cv2.imread`` would (BGR, C = 3).

    Greyscale masks are returned with ``C = 1`` (all cv2 channels would be equal); palette
    images are mapped through their palette; alpha is dropped.
    """
    im = _open(path)
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.uint8)[..., None]
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return rgb[..., ::-1]  # BGR, cv2's channel order


def binary_gt(channels: np.ndarray, rule: str) -> np.ndarray:
    """Turn decoded mask channels (``uint8[H, W, C]``, cv2 order) into ``int8[H, W]`` gt.

    Args:
      channels: from :func:`read_mask_channels`.
      rule: ``"grabcut"`` (first channel: 128 ignore, > 128 object), ``"davis"`` (max over
        channels > 0), or ``"coco_mval"`` (first channel 255 object).
    """
    if rule == "grabcut":
        first = channels[..., 0]
        gt = (first > 128).astype(np.int8)
        gt[first == 128] = IGNORE
        return gt
    if rule == "davis":
        return (channels.max(axis=-1) > 0).astype(np.int8)
    if rule == "coco_mval":
        return (channels[..., 0] == 255).astype(np.int8)
    raise ValueError(f"unknown mask rule {rule!r}")


def instance_gt(instances: np.ndarray, instance_id: int, ignore: np.ndarray | None) -> np.ndarray:
    """``int8[H, W]`` gt of one instance of an id map, with optional ignore pixels."""
    gt = (instances == instance_id).astype(np.int8)
    if ignore is not None:
        gt[ignore] = IGNORE
    return gt


def read_semantic_mask(path: str | Path, rule: str) -> np.ndarray:
    """Read a single-object mask file and apply ``rule`` (see :func:`binary_gt`)."""
    return binary_gt(read_mask_channels(path), rule)


def read_sbd_instances(path: str | Path) -> tuple[np.ndarray, list[int], np.ndarray | None]:
    """Read SBD ``inst/<id>.mat``: ``(id map int32[H, W], instance ids, ignore or None)``.

    ``GTinst.Segmentation`` holds 0 for background and one id per instance; 255, if present,
    is treated as ignore.
    """
    from scipy.io import loadmat

    path = as_path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with path.open("rb") as fh:
            mat = loadmat(fh)
        seg = np.asarray(mat["GTinst"][0, 0]["Segmentation"], dtype=np.int32)
    except (KeyError, ValueError, IndexError, TypeError, OSError) as e:
        raise DataError(f"cannot read GTinst.Segmentation from {path}: {e}") from e
    return _instances(seg, boundary=255)


def read_voc_instances(path: str | Path) -> tuple[np.ndarray, list[int], np.ndarray | None]:
    """Read a VOC ``SegmentationObject`` PNG: ``(id map, instance ids, ignore or None)``.

    Palette PNGs (the upstream format) give indices: 0 background, 1..N instances, 255
    boundary. PNGs saved as colour are converted to grey like RITM (ITU-R 601), with grey 220
    (the boundary colour) as ignore and every other non-zero grey value one instance.
    """
    im = _open(path)
    if im.mode == "P" or im.mode == "L":
        seg = np.asarray(im, dtype=np.int32)
        boundary = 255
    else:
        seg = np.asarray(im.convert("RGB").convert("L"), dtype=np.int32)
        boundary = 220
    return _instances(seg, boundary=boundary)


def _instances(seg: np.ndarray, boundary: int) -> tuple[np.ndarray, list[int], np.ndarray | None]:
    ignore = seg == boundary
    ids = [int(v) for v in np.unique(seg) if v != 0 and v != boundary]
    return seg, ids, (ignore if ignore.any() else None)


def check_same_size(image: np.ndarray, gt: np.ndarray, image_path: Path, mask_path: Path) -> None:
    """Raise :class:`DataError` naming both files if image and mask sizes differ."""
    if image.shape[:2] != gt.shape[:2]:
        raise DataError(
            f"image {image_path} is {image.shape[1]}x{image.shape[0]} but mask {mask_path} is "
            f"{gt.shape[1]}x{gt.shape[0]}"
        )
