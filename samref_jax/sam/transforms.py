"""SAM's pre- and post-processing: resize the longest side, and back.

Host side (NumPy/Pillow): `as_rgb_uint8` (any image array -> HxWx3 uint8),
`resize_longest_side`, `normalize_and_pad`, `apply_coords`, `apply_boxes`.
Device side (jittable): `upscale_to_frame`, `postprocess_masks`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from PIL import Image

from samref_jax.sam.common import resize_bilinear
from samref_jax.sam.config import SamConfig


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `long_side`, rounded as SAM does."""
    scale = long_side * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def check_frame_size(height: int, width: int, long_side: int) -> None:
    """ValueError when an image's short side rounds to 0 pixels at the model's frame."""
    h, w = get_preprocess_shape(height, width, long_side)
    if min(h, w) < 1:
        need = math.ceil(max(height, width) / (2.0 * long_side))
        raise ValueError(
            f"image of {width}x{height} pixels is too small for this model: scaled to its "
            f"{long_side}-pixel frame, the short side rounds to 0 pixels (it needs at least "
            f"{need} pixels at this long side)"
        )


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """HxWx3 uint8 -> hxwx3 uint8 with PIL bilinear (what SAM's torchvision call does)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    check_frame_size(image.shape[0], image.shape[1], long_side)
    h, w = get_preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def apply_coords(coords: np.ndarray, original_hw: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 2) (x, y) in original pixels -> the resized frame, float64 as SAM computes them."""
    old_h, old_w = original_hw
    new_h, new_w = get_preprocess_shape(old_h, old_w, long_side)
    coords = np.array(coords, dtype=np.float64, copy=True)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def apply_boxes(boxes: np.ndarray, original_hw: tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 4) XYXY boxes in original pixels -> the resized frame."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return apply_coords(boxes.reshape(-1, 2, 2), original_hw, long_side).reshape(boxes.shape)


def upscale_to_frame(low_res: jax.Array, config: SamConfig) -> jax.Array:
    """(..., 4S, 4S) logits -> (..., img_size, img_size), torch bilinear."""
    return resize_bilinear(low_res, (config.img_size, config.img_size))


def postprocess_masks(
    low_res: jax.Array,
    input_hw: tuple[int, int],
    original_hw: tuple[int, int],
    config: SamConfig,
) -> jax.Array:
    """SAM's `postprocess_masks`: upscale to the frame, crop the padding, resize to the original.

    low_res (..., 4S, 4S) logits -> (..., H, W) logits. Shapes are static.
    """
    masks = upscale_to_frame(low_res, config)
    masks = masks[..., : input_hw[0], : input_hw[1]]
    return resize_bilinear(masks, original_hw)


def normalize_and_pad(resized: np.ndarray, cfg: SamConfig) -> np.ndarray:
    """hxwx3 uint8 resized image -> (1, S, S, 3) float32: normalise, then zero-pad (host side,
    float32 arithmetic exactly as torch does it)."""
    mean = np.asarray(cfg.pixel_mean, np.float32)
    std = np.asarray(cfg.pixel_std, np.float32)
    x = (resized.astype(np.float32) - mean) / std
    out = np.zeros((1, cfg.img_size, cfg.img_size, 3), np.float32)
    out[0, : x.shape[0], : x.shape[1]] = x
    return out


def as_rgb_uint8(image: np.ndarray, image_format: str = "RGB") -> np.ndarray:
    """Accepts HxW (grey), HxWx1, HxWx3, HxWx4 (alpha dropped); uint8 or uint16 (scaled).

    Anything else raises ValueError with a clear message.
    """
    arr = np.asarray(image)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "uif":
        raise ValueError(f"image must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(np.shape(image))}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image is empty: shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError("float images must hold values in [0, 1]")
        arr = (arr * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"integer image of dtype {arr.dtype} has values outside 0..255")
        arr = arr.astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    if image_format == "BGR":
        arr = arr[..., ::-1]
    elif image_format != "RGB":
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    return np.ascontiguousarray(arr)
