"""SamPredictor behaviour on a small model: traces, padding invariance, input handling."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from samref_jax.sam import predictor as pred_mod
from samref_jax.sam import sam_config
from samref_jax.sam.build import SamModel
from samref_jax.sam.model import init_sam_params
from samref_jax.sam.predictor import PROMPT_BUCKETS, SamPredictor
from samref_jax.sam.transforms import as_rgb_uint8


@pytest.fixture(scope="module")
def predictor():
    cfg = sam_config("tiny")
    params = init_sam_params(cfg, jax.random.key(0, impl="rbg"))
    p = SamPredictor(SamModel(cfg, params))
    rng = np.random.RandomState(0)
    p.set_image(rng.randint(0, 255, (90, 120, 3), dtype=np.uint8))
    return p


def test_shapes(predictor):
    m, s, low = predictor.predict(point_coords=np.array([[10, 20]]), point_labels=np.array([1]))
    assert m.shape == (3, 90, 120) and m.dtype == bool
    assert s.shape == (3,) and low.shape == (3, 32, 32)
    m, s, low = predictor.predict(
        box=np.array([5, 5, 60, 50]), multimask_output=False, return_logits=True
    )
    assert m.shape == (1, 90, 120) and m.dtype == np.float32
    assert predictor.get_image_embedding().shape == (1, 32, 8, 8)


def test_twenty_clicks_trace_once_per_bucket(predictor):
    """20 successive clicks (with mask_input fed back) compile the prompt path once per padded
    size: buckets 4, 8, 16, 32 -> at most 4 traces."""
    before = pred_mod._decode._cache_size()
    rng = np.random.RandomState(1)
    pts, labs, low = [], [], None
    for _ in range(20):
        pts.append(rng.uniform(0, 90, 2))
        labs.append(int(rng.randint(0, 2)))
        _, s, lows = predictor.predict(
            point_coords=np.array(pts),
            point_labels=np.array(labs),
            mask_input=low,
            multimask_output=low is None,
        )
        low = lows[np.argmax(s)][None]
    added = pred_mod._decode._cache_size() - before
    assert added <= len([b for b in PROMPT_BUCKETS if b <= 32])


def test_padding_does_not_change_results(predictor):
    """The same prompt padded to 4 or to 64 slots (and with the cached or a freshly computed
    positional encoding) gives identical outputs."""
    kw = dict(point_coords=np.array([[30, 40], [60, 10]]), point_labels=np.array([1, 0]))
    a = predictor.predict(**kw)
    c, lab = predictor.encode_prompts(kw["point_coords"], kw["point_labels"], None)
    c64 = np.zeros((1, 64, 2), np.float32)
    l64 = np.full((1, 64), -1, np.int32)
    c64[:, :4], l64[:, :4] = c, lab
    m = predictor.model
    masks4, _ = pred_mod._decode(
        m.module,
        m.params,
        predictor.features,
        c,
        lab,
        np.zeros((1, 32, 32), np.float32),
        np.zeros(1, bool),
        None,  # the positional encoding computed inside the call ...
    )
    masks64, _ = pred_mod._decode(
        m.module,
        m.params,
        predictor.features,
        c64,
        l64,
        np.zeros((1, 32, 32), np.float32),
        np.zeros(1, bool),
        predictor._image_pe,  # ... or the one the predictor cached: the same numbers
    )
    np.testing.assert_allclose(np.asarray(masks4), np.asarray(masks64), atol=1e-5)
    np.testing.assert_allclose(np.asarray(masks4)[0, 1:], a[2], atol=1e-6)


def test_image_conversions():
    rgb = np.random.RandomState(0).randint(0, 255, (5, 6, 3), dtype=np.uint8)
    assert as_rgb_uint8(rgb).dtype == np.uint8
    assert as_rgb_uint8(rgb[..., 0]).shape == (5, 6, 3)
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(as_rgb_uint8(rgba), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(rgb.astype(np.uint16) * 257), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(rgb, "BGR"), rgb[..., ::-1])
    for bad, msg in [
        (np.zeros((5, 6, 2), np.uint8), "HxW, HxWx1, HxWx3 or HxWx4"),
        (np.zeros((5,), np.uint8), "HxW, HxWx1"),
        (np.array([["a"]]), "numeric"),
        (np.full((3, 3), 2.0), r"\[0, 1\]"),
        (np.full((3, 3), -1, np.int32), "outside 0..255"),
    ]:
        with pytest.raises(ValueError, match=msg):
            as_rgb_uint8(bad)


def test_errors(predictor):
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(point_coords=np.array([[1, 2]]))
    with pytest.raises(ValueError, match="0 \\(negative\\) or 1"):
        predictor.predict(point_coords=np.array([[1, 2]]), point_labels=np.array([2]))
    with pytest.raises(ValueError, match="XYXY"):
        predictor.predict(box=np.array([1, 2, 3]))
    fresh = SamPredictor(predictor.model)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(point_coords=np.array([[1, 2]]), point_labels=np.array([1]))
