"""`frame_to_original` (tiled, bounded programs) equals the direct per-size resize bit for bit,
and its compiled programs do not grow with new image sizes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samref_jax.sam import sam_config
from samref_jax.sam.common import resize_bilinear
from samref_jax.sam.transforms import (
    RESIZE_TILES,
    frame_to_original,
    get_preprocess_shape,
    postprocess_masks,
    resize_programs,
    resize_tiles,
    upscale_to_frame,
)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _direct(frame, input_hw, original_hw):
    """What the predictors compiled per image size before: crop, then resize_bilinear."""
    return resize_bilinear(frame[:, : input_hw[0], : input_hw[1]], original_hw)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).view(np.uint32 if x.dtype == np.float32 else np.uint16)


# (H, W) at frame F: both axes shrinking or growing, the column-first order (W grows), an axis
# equal to the frame's (skipped by resize_bilinear), 1-pixel sides, axes split into tiles.
SIZES = [(90, 120), (120, 90), (64, 64), (32, 64), (7, 300), (300, 7), (1, 9), (1100, 500)]
SIZES += [(700, 2100), (33, 2049), (1000, 10)]


@pytest.mark.parametrize("frame", [64, 128])
def test_equals_the_direct_resize_bit_for_bit(frame):
    rng = np.random.default_rng(frame)
    x = jnp.asarray(rng.normal(0, 8, (3, frame, frame)).astype(np.float32))
    for h, w in SIZES:
        input_hw = get_preprocess_shape(h, w, frame)
        want = np.asarray(_direct(x, input_hw, (h, w)))
        got = frame_to_original(x, input_hw, (h, w))
        assert got.shape == (3, h, w) and got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"size {(h, w)}")


def test_degenerate_two_pixel_wide_frame_is_within_rounding():
    """Beyond ~60:1 (tall) the resized image is 2 pixels wide; XLA contracts that per-size
    program's products into FMAs differently, so values may differ by rounding there."""
    x = jnp.asarray(np.random.default_rng(3).normal(0, 8, (3, 128, 128)).astype(np.float32))
    input_hw = get_preprocess_shape(2049, 33, 128)
    assert input_hw == (128, 2)
    want = np.asarray(_direct(x, input_hw, (2049, 33)))
    got = frame_to_original(x, input_hw, (2049, 33))
    assert (got == want).mean() > 0.8
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.finfo(np.float32).eps * 40)


def test_sam_postprocess_equals_upscale_then_frame_to_original():
    """SamPredictor's old fused program (upscale, crop, resize in one) against the split path:
    equal bit for bit, in float32 and bfloat16."""
    cfg = sam_config("tiny")
    low = np.random.default_rng(1).normal(0, 8, (1, 3, cfg.img_size // 4, cfg.img_size // 4))
    for dtype in (jnp.float32, jnp.bfloat16):
        low_res = jnp.asarray(low, dtype)
        frame = jax.jit(upscale_to_frame, static_argnums=1)(low_res, cfg)[0]
        for h, w in [(90, 120), (333, 250), (17, 5)]:
            input_hw = get_preprocess_shape(h, w, cfg.img_size)
            want = jax.jit(postprocess_masks, static_argnums=(1, 2, 3))(
                low_res, input_hw, (h, w), cfg
            )[0]
            got = frame_to_original(frame, input_hw, (h, w))
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(_bits(got), _bits(np.asarray(want)))


def test_new_sizes_in_warm_tiles_compile_nothing():
    x = jnp.zeros((2, 64, 64), jnp.float32)
    frame_to_original(x, get_preprocess_shape(200, 300, 64), (200, 300))
    before = resize_programs()
    for h, w in [(199, 299), (250, 380), (230, 260), (211, 383)]:  # the same tiles, 256 x 384
        assert [resize_tiles(n)[1] for n in (h, w)] == [256, 384]
        frame_to_original(x, get_preprocess_shape(h, w, 64), (h, w))
    assert resize_programs() == before


def test_tiles_and_errors():
    assert resize_tiles(1) == (1, RESIZE_TILES[0])
    assert resize_tiles(1024) == (1, 1024) and resize_tiles(1025) == (2, 768)
    assert resize_tiles(5000) == (5, 1024)
    with pytest.raises(ValueError, match=r"\(B, F, F\)"):
        frame_to_original(jnp.zeros((64, 64)), (64, 64), (10, 10))
    with pytest.raises(ValueError, match="positive sizes"):
        frame_to_original(jnp.zeros((1, 64, 64)), (64, 64), (0, 10))
