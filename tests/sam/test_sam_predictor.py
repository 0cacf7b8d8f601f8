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


def _single_calls(predictor, n, pts, labs, boxes, masks, **kw):
    outs = [
        predictor.predict(
            point_coords=None if pts is None else pts[i],
            point_labels=None if labs is None else labs[i],
            box=None if boxes is None else boxes[i],
            mask_input=None if masks is None else masks[i],
            **kw,
        )
        for i in range(n)
    ]
    return [np.stack(x) for x in zip(*outs, strict=True)]


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_batch_equals_single_calls(predictor, multimask):
    """Row i of one batched call is `predict` on row i's prompts (masks, scores, low-res), for
    points, boxes, points + boxes and points + mask_input."""
    rng = np.random.RandomState(2)
    n = 3
    c = 3 if multimask else 1
    kw = dict(multimask_output=multimask, return_logits=True)
    for prompts in ("points", "boxes", "points+boxes", "points+mask"):
        pts = labs = boxes = masks = None
        if "points" in prompts:
            pts = rng.uniform(0, 90, (n, 2, 2))
            labs = rng.randint(0, 2, (n, 2))
        if "boxes" in prompts:
            xy = rng.uniform(0, 40, (n, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(20, 50, (n, 2))], axis=1)
        if "mask" in prompts:
            masks = rng.normal(0, 3, (n, 1, 32, 32)).astype(np.float32)
        got = predictor.predict_batch(pts, labs, boxes, masks, **kw)
        want = _single_calls(predictor, n, pts, labs, boxes, masks, **kw)
        assert got[0].shape == (n, c, 90, 120) and got[1].shape == (n, c), prompts
        assert got[2].shape == (n, c, 32, 32), prompts
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=prompts)
    thresholded = predictor.predict_batch(pts, labs, boxes, masks, multimask_output=multimask)[0]
    assert thresholded.dtype == bool
    np.testing.assert_array_equal(thresholded, got[0] > 0)


def test_predict_batch_sizes_share_a_compile(predictor):
    """N = 3 and N = 5 pad to the same batch bucket: one trace for both; N = 70 runs in chunks
    and still matches the single calls."""
    rng = np.random.RandomState(3)
    pts = rng.uniform(0, 90, (5, 1, 2))
    labs = np.ones((5, 1), np.int32)
    predictor.predict_batch(pts[:3], labs[:3])
    before = pred_mod._predict_batch._cache_size()
    predictor.predict_batch(pts[:5], labs[:5])
    assert pred_mod._predict_batch._cache_size() == before
    assert pred_mod.batch_bucket(3) == pred_mod.batch_bucket(5)
    pts = rng.uniform(0, 90, (70, 1, 2))
    labs = np.ones((70, 1), np.int32)
    _, scores, low = predictor.predict_batch(pts, labs, multimask_output=False)
    assert scores.shape == (70, 1) and low.shape == (70, 1, 32, 32)
    for i in (0, 63, 64, 69):
        _, s, lo = predictor.predict(pts[i], labs[i], multimask_output=False)
        np.testing.assert_allclose(scores[i], s, atol=1e-4)
        np.testing.assert_allclose(low[i], lo, atol=1e-4)


def test_predict_batch_errors(predictor):
    with pytest.raises(ValueError, match=r"\(N, K, 2\)"):
        predictor.predict_batch(np.zeros((2, 2)), np.ones((2,)))
    with pytest.raises(ValueError, match="disagree on N"):
        predictor.predict_batch(np.zeros((2, 1, 2)), np.ones((2, 1)), boxes=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="needs point_coords"):
        predictor.predict_batch()
