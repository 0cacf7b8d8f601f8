"""SAM's pre- and post-processing: resize the longest side, and back.

Host side (NumPy/Pillow): `resize_longest_side`, `apply_coords`, `apply_boxes`.
Device side (jittable): `upscale_to_frame`, `postprocess_masks`. Normalising and padding the
frame is the predictors' (`samref_jax.sam.predictor`) and the training step's.
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
