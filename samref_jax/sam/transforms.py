"""SAM's pre- and post-processing: resize the longest side, and back.

Host side (NumPy/Pillow): `as_rgb_uint8` (any image array -> HxWx3 uint8),
`resize_longest_side`, `normalize_and_pad`, `apply_coords`, `apply_boxes`.
Device side (jittable): `upscale_to_frame`, `postprocess_masks`.
Host-driven: `frame_to_original` (the frame -> original-size resize of `postprocess_masks`,
exactly, with a bounded set of compiled programs whatever the image sizes).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from samref_jax.sam.common import _linear_weights, resize_bilinear
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


# Tile lengths (output pixels per axis) of `frame_to_original`.
RESIZE_TILES = (128, 256, 384, 512, 768, 1024)


def resize_tiles(n: int) -> tuple[int, int]:
    """(count, length) of the tiles `frame_to_original` splits an n-pixel output axis into:
    the fewest tiles of at most the largest length, each of the smallest length holding its
    share."""
    count = -(-n // RESIZE_TILES[-1])
    share = -(-n // count)
    return count, next(t for t in RESIZE_TILES if share <= t)


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`resize_bilinear`'s (i0, i1, w1) along one axis; the identity when the sizes agree
    (where `resize_bilinear` skips the axis: a * 1 + a * 0 == a)."""
    if in_size == out_size:
        i = np.arange(out_size, dtype=np.int64)
        return i, i, np.zeros(out_size, np.float32)
    return _linear_weights(in_size, out_size)


@functools.partial(jax.jit, static_argnames=("rows_first",))
def _resize_tile(
    x: jax.Array,
    rows: tuple[jax.Array, jax.Array, jax.Array],
    cols: tuple[jax.Array, jax.Array, jax.Array],
    *,
    rows_first: bool,
) -> jax.Array:
    """One (B, T, U) tile of a bilinear resize of x (B, F, F): rows = (i0, i1, w1) (T,) and
    cols = (i0, i1, w1) (U,) of `_linear_weights`, rows or columns first, with the operations
    of `resize_bilinear` in its order. Compiled once per (x's shape and dtype, T, U,
    rows_first). One program for both axes: XLA then computes the first axis only where the
    second one reads it."""

    def lerp(y: jax.Array, i0: jax.Array, i1: jax.Array, w1: jax.Array, axis: int) -> jax.Array:
        shape = [1] * y.ndim
        shape[axis] = w1.shape[0]
        w = w1.reshape(shape).astype(y.dtype)
        a = jnp.take(y, i0, axis=axis, mode="clip")  # indices are in range: no fill masks
        b = jnp.take(y, i1, axis=axis, mode="clip")
        return a * (1 - w) + b * w

    if rows_first:
        return lerp(lerp(x, *rows, 1), *cols, 2)
    return lerp(lerp(x, *cols, 2), *rows, 1)


def frame_to_original(
    frame_logits: jax.Array, input_hw: tuple[int, int], original_hw: tuple[int, int]
) -> np.ndarray:
    """Frame logits -> the original image's size: `postprocess_masks` after the upscale.

    frame_logits (B, F, F) (the resized image at the top left, padding after it); input_hw
    (h, w) the resized image's size inside the frame; original_hw (H, W) the output size.
    Returns (B, H, W) NumPy of frame_logits' dtype, equal element for element to
    ``resize_bilinear(frame_logits[:, :h, :w], (H, W))`` (the same gathers and products in the
    same order; the crop is implicit, no index reaches the padding).

    The indices and weights of the true output size are computed here and fed to the device in
    tiles of `RESIZE_TILES` lengths (zero-weight padding, cropped here; one tile per axis up to
    1024 pixels). The compiled programs thus depend on B, F, the dtype and the tile lengths
    (at most 2 * 6 * 6 of them, see `resize_programs`), never on the image size itself, so a
    long-lived process meeting any number of image sizes holds a bounded set.
    """
    (h_in, w_in), (h, w) = input_hw, original_hw
    if frame_logits.ndim != 3 or min(h_in, w_in, h, w) < 1:
        raise ValueError(
            f"expected (B, F, F) frame logits and positive sizes, got {frame_logits.shape}, "
            f"input {input_hw}, original {original_hw}"
        )

    def tiles(in_size: int, out_size: int) -> list[tuple[int, int, tuple[np.ndarray, ...]]]:
        """[(start, length, (i0, i1, w1) padded to the tile length)] along one axis."""
        weights = _axis_weights(in_size, out_size)
        count, n = resize_tiles(out_size)
        step = -(-out_size // count)
        out = []
        for start in range(0, out_size, step):
            part = []
            for v in weights:
                full = np.zeros(n, np.float32 if v.dtype == np.float32 else np.int32)
                piece = v[start : start + step]
                full[: len(piece)] = piece
                part.append(full)  # NumPy: jit transfers it, no per-shape staging program
            out.append((start, min(step, out_size - start), tuple(part)))
        return out

    # resize_bilinear resizes the columns first when they grow (its inner-axis rule).
    rows_first = not w > w_in
    done = []  # all dispatched before any is read back: the device runs ahead of the host
    for r, nr, rw in tiles(h_in, h):
        for c, nc, cw in tiles(w_in, w):
            tile = _resize_tile(frame_logits, rw, cw, rows_first=rows_first)
            done.append((r, nr, c, nc, tile))
    out = np.empty((frame_logits.shape[0], h, w), frame_logits.dtype)
    for r, nr, c, nc, tile in done:
        out[:, r : r + nr, c : c + nc] = np.asarray(tile)[:, :nr, :nc]
    return out


def resize_programs() -> int:
    """Compiled programs `frame_to_original` holds (its jit cache entries)."""
    return _resize_tile._cache_size()


def normalize_and_pad(resized: np.ndarray, cfg: SamConfig, size: int | None = None) -> np.ndarray:
    """hxwx3 uint8 resized image -> (1, S, S, 3) float32: normalise, then zero-pad (host side,
    float32 arithmetic exactly as torch does it). S: ``size``, default the frame ``img_size``."""
    mean = np.asarray(cfg.pixel_mean, np.float32)
    std = np.asarray(cfg.pixel_std, np.float32)
    x = (resized.astype(np.float32) - mean) / std
    s = cfg.img_size if size is None else int(size)
    out = np.zeros((1, s, s, 3), np.float32)
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
