"""SAM-REF model: the per-click step, its modes, gradients, traces, bf16, predictor, checkpoints."""

from __future__ import annotations

import types
import warnings

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from samref_jax.checkpoint import CheckpointError, save_model_checkpoint
from samref_jax.samref.config import sam_config_from, samref_model_config
from samref_jax.samref.io import load_samref, save_samref
from samref_jax.samref.model import ClickState, ImageContext, SamRef, init_samref_params
from samref_jax.samref.predictor import SamRefPredictor

KEY = jax.random.key(0, impl="rbg")


@pytest.fixture(scope="module")
def setup():
    cfg = samref_model_config("tiny")
    cfg.max_clicks = 8
    params = init_samref_params(cfg, KEY)
    return cfg, params


def _inputs(cfg, params, n_clicks=2, batch=2, seed=0):
    rng = np.random.RandomState(seed)
    model = SamRef(ml_collections.FrozenConfigDict(cfg))
    f = 128
    img = jnp.asarray(rng.randn(batch, f, f, 3).astype(np.float32))
    emb = model.apply({"params": params}, img, method=SamRef.embed_image)
    n = int(cfg.max_clicks)
    coords = np.zeros((batch, n, 2), np.float32)
    labels = np.full((batch, n), -1, np.int32)
    coords[:, :n_clicks] = rng.uniform(10, 100, (batch, n_clicks, 2))
    labels[:, :n_clicks] = rng.randint(0, 2, (batch, n_clicks))
    labels[:, 0] = 1
    ctx = ImageContext(
        embedding=emb,
        image=img,
        valid_hw=jnp.asarray([[128, 96]] * batch, jnp.int32),
        radius=jnp.full((batch,), 3.0),
    )
    state = ClickState(
        coords=jnp.asarray(coords),
        labels=jnp.asarray(labels),
        num_clicks=jnp.full((batch,), n_clicks, jnp.int32),
        prev_low_res=jnp.asarray(rng.randn(batch, 32, 32).astype(np.float32)),
        has_prev=jnp.asarray([n_clicks > 1] * batch),
        prev_logits=jnp.asarray(rng.randn(batch, f, f).astype(np.float32) * 3),
    )
    return model, ctx, state


def _click(model, mode):
    """(params, ctx, state) -> this click's outputs."""
    return lambda p, c, x: model.apply({"params": p}, c, x, mode, method=SamRef.click)[0]


@pytest.mark.parametrize("mode", ["sam", "global", "full"])
def test_shapes_and_jit(setup, mode):
    cfg, params = setup
    model, c, x = _inputs(cfg, params)
    fn = _click(model, mode)
    out = fn(params, c, x)
    out_j = jax.jit(fn)(params, c, x)
    chex.assert_shape(out.low_res, (2, 32, 32))
    for a in (out.sam_logits, out.global_logits, out.final_logits, out.global_error_logits):
        chex.assert_shape(a, (2, 128, 128))
        chex.assert_type(a, jnp.float32)
    chex.assert_shape(out.window, (2, 4))
    chex.assert_shape(out.score, (2,))
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(out_j), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)
    if mode == "full":
        w = np.asarray(out.window)
        assert (w[:, 2] > w[:, 0]).all() and (w[:, 3] > w[:, 1]).all()
        assert (w[:, 2] <= 96 + 1e-3).all() and (w[:, 3] <= 128 + 1e-3).all()


def test_untrained_refiners_return_sam(setup):
    cfg, params = setup
    model, c, x = _inputs(cfg, params, n_clicks=3)
    sam = _click(model, "sam")(params, c, x)
    full = _click(model, "full")(params, c, x)
    s, f = np.asarray(sam.final_logits), np.asarray(full.final_logits)
    assert np.abs(f - s).max() <= 0.05 * np.abs(s).max() + 0.02
    assert ((f > 0) == (s > 0)).mean() >= 0.99
    np.testing.assert_array_equal(np.asarray(sam.low_res), np.asarray(full.low_res))


@pytest.mark.parametrize("mode", ["global", "full"])
def test_cached_global_context_gives_identical_outputs(setup, mode):
    """GlobalDiff's per-image inputs computed once (as SamRefPredictor does) give the very same
    outputs as the step computing them, with and without jit; the params tree is unchanged."""
    cfg, params = setup
    params = jax.tree_util.tree_map(
        lambda a: a + 0.05 * jax.random.normal(KEY, a.shape, a.dtype), params
    )
    model, c, x = _inputs(cfg, params, n_clicks=3)
    context_fn = lambda p, i, e: model.apply({"params": p}, i, e, method=SamRef.global_context)
    fn = _click(model, mode)
    for f, cf in ((fn, context_fn), (jax.jit(fn), jax.jit(context_fn))):
        context = cf(params, c.image, c.embedding)
        chex.assert_shape(context.image, (2, 128, 128, 3))
        chex.assert_shape(context.embedding[..., 0], (2, 64, 64))
        want, got = f(params, c, x), f(params, c._replace(global_context=context), x)
        for a, b in zip(
            jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another image's context gives another result: the step really reads it.
    other = context_fn(params, c.image[::-1], c.embedding[::-1])
    moved = fn(params, c._replace(global_context=other), x).global_logits
    assert not np.array_equal(np.asarray(moved), np.asarray(want.global_logits))


@pytest.mark.parametrize("mode", ["sam", "full"])
def test_cached_decoder_layer0_gives_the_same_outputs(setup, mode):
    """SAM's decoder's first layer with its per-image products computed once (as the predictor
    does; the dense prompt then enters in factored form) gives the step's outputs up to float32
    re-association, with and without jit, for rows with and without a mask input."""
    cfg, params = setup
    params = jax.tree_util.tree_map(
        lambda a: a + 0.05 * jax.random.normal(KEY, a.shape, a.dtype), params
    )
    model, c, x = _inputs(cfg, params, n_clicks=3)
    x = x._replace(has_prev=jnp.asarray([True, False]))  # one row with a mask input, one without
    pe = model.apply({"params": params}, method=SamRef.dense_pe)
    c = c._replace(image_pe=pe)
    layer0_fn = lambda p, e, pe: model.apply({"params": p}, e, pe, method=SamRef.decoder_layer0)
    fn = _click(model, mode)
    for f, lf in ((fn, layer0_fn), (jax.jit(fn), jax.jit(layer0_fn))):
        layer0 = lf(params, c.embedding, pe)
        assert sorted(layer0) == ["i2t_q", "t2i_k", "t2i_v"]
        scfg = sam_config_from(cfg)
        n, i = scfg.image_embedding_size**2, scfg.prompt_embed_dim // 2
        chex.assert_shape(layer0["i2t_q"], (2, n, i))
        chex.assert_shape([layer0["t2i_k"], layer0["t2i_v"]], (2, i, n))  # the layout read
        want, got = f(params, c, x), f(params, c._replace(decoder_layer0=layer0), x)
        for a, b in ((want.low_res, got.low_res), (want.final_logits, got.final_logits)):
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
            assert ((a > 0) == (b > 0)).mean() >= 0.999
        np.testing.assert_allclose(np.asarray(want.score), np.asarray(got.score), atol=1e-5)
    # Another image's products give another result: the step really reads them.
    other = layer0_fn(params, c.embedding[::-1], pe)
    moved = fn(params, c._replace(decoder_layer0=other), x).low_res
    assert np.abs(np.asarray(moved) - np.asarray(want.low_res)).max() > 1e-3


def test_first_click_picks_best_multimask(setup):
    cfg, params = setup
    model, c, x = _inputs(cfg, params, n_clicks=1)
    out = _click(model, "sam")(params, c, x)
    sc = model.apply(
        {"params": params},
        c.embedding,
        x.coords,
        x.labels,
        x.prev_low_res,
        x.has_prev,
        method=lambda m, *a: m.sam.predict_masks(*a),
    )[1]
    np.testing.assert_allclose(np.asarray(out.score), np.asarray(sc)[:, 1:].max(-1), atol=1e-6)


def test_gradients_reach_refiners_not_frozen_encoder(setup):
    cfg, params = setup
    model, c, x = _inputs(cfg, params)
    gt = (jnp.arange(128)[None, :, None] < 64).astype(jnp.float32) * jnp.ones((2, 128, 128))

    def loss(p):
        emb = jax.lax.stop_gradient(model.apply({"params": p}, c.image, method=SamRef.embed_image))
        out = _click(model, "full")(p, c._replace(embedding=emb), x)
        bce = lambda z: jnp.mean(jnp.logaddexp(0, z) - gt * z)
        return (
            bce(out.final_logits)
            + bce(out.global_logits)
            + jnp.mean(jax.nn.sigmoid(out.global_error_logits))
        )

    # Untrained refiners return S exactly (zero detail heads), so only the heads would get a
    # gradient: move the detail heads off zero, as one optimiser step does.
    params = jax.tree.map(lambda a: a, params)
    for name in ("global_diff", "patch_diff"):
        head = params[name]["refiner"]["detail_head"]
        head["kernel"] = head["kernel"] + 0.01
    grads = jax.jit(jax.grad(loss))(params)
    for name in ("global_diff", "patch_diff"):
        for path, g in jax.tree_util.tree_flatten_with_path(grads[name])[0]:
            assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, (
                name,
                jax.tree_util.keystr(path),
            )
    enc = jax.tree_util.tree_leaves(grads["sam"]["image_encoder"])
    assert all(np.all(np.asarray(g) == 0) for g in enc)
    dec = jax.tree_util.tree_leaves(grads["sam"]["mask_decoder"])
    assert any(np.abs(np.asarray(g)).max() > 0 for g in dec)


def test_twenty_clicks_trace_step_once(setup):
    cfg, params = setup
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.max_clicks = 24
    model, c, _ = _inputs(cfg, params, n_clicks=1, batch=1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, c, x, xy, label):
        return model.apply({"params": p}, c, x.add_click(xy, label), "full", method=SamRef.click)

    state = ClickState.empty(cfg)
    for k in range(1, 21):
        xy = jnp.asarray([[5.0 + 5 * k, 100.0 - 4 * k]])
        out, state = step(params, c, state, xy, jnp.asarray([k % 2]))
    jax.block_until_ready(out)
    assert int(state.num_clicks[0]) == 20 and bool(state.has_prev[0])


def test_click_state_adds_pads_and_feeds_back(setup):
    cfg, _ = setup
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.max_clicks = 3
    x = ClickState.empty(cfg, batch=2)
    assert not x.has_prev.any() and (np.asarray(x.num_clicks) == 0).all()
    np.testing.assert_array_equal(x.prev_logits, np.full((2, 128, 128), cfg.first_prev_logit))
    y = x.add_click(jnp.asarray([[1.0, 2.0], [5.0, 6.0]]), jnp.asarray([1, 1]))
    y = y.add_click(jnp.asarray([[3.0, 4.0], [7.0, 8.0]]), jnp.asarray([0, 1]))
    np.testing.assert_array_equal(y.labels, [[1, 0, -1], [1, 1, -1]])
    np.testing.assert_array_equal(y.coords[1], [[5, 6], [7, 8], [0, 0]])
    np.testing.assert_array_equal(y.num_clicks, [2, 2])
    full = y.add_click(jnp.ones((2, 2)), jnp.ones(2)).add_click(jnp.zeros((2, 2)), jnp.zeros(2))
    np.testing.assert_array_equal(full.labels, [[1, 0, 1], [1, 1, 1]])  # no slot left: kept
    np.testing.assert_array_equal(full.num_clicks, [3, 3])
    w = x.with_clicks([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], [[1, 0], [1, 1]])
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(a, b)
    out = types.SimpleNamespace(mask_input=x.prev_low_res + 1, final_logits=x.prev_logits + 2)
    z = y.feed_back(out)
    assert z.has_prev.all() and z.labels is y.labels
    np.testing.assert_array_equal(z.prev_low_res, out.mask_input)
    np.testing.assert_array_equal(z.prev_logits, out.final_logits)
    # Same shapes and dtypes after every transition: a jitted step never retraces.
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), x, z)
    assert all(jax.tree.leaves(same))
    for bad in ([], np.ones((4, 2))):
        with pytest.raises(ValueError, match="clicks"):
            ClickState.empty(cfg).with_clicks(bad, np.ones(len(bad)))


def test_empty_state_is_not_weakly_typed(setup):
    # A weakly typed leaf (e.g. a Python-float fill) would retrace the step on click 2, when
    # the fed-back outputs arrive with strong types.
    cfg, params = setup
    model = SamRef(ml_collections.FrozenConfigDict(cfg))
    x = ClickState.empty(cfg)
    c = ImageContext.blank(cfg)
    assert not any(leaf.weak_type for leaf in jax.tree_util.tree_leaves((x, c)))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, c, x):
        return model.apply({"params": p}, c, x, "full", method=SamRef.click)

    _, x = step(params, c, x.add_click(jnp.zeros((1, 2)), jnp.ones(1)))
    jax.block_until_ready(step(params, c, x.add_click(jnp.ones((1, 2)), jnp.zeros(1))))


def test_prepare_matches_the_parts(setup):
    """``SamRef.prepare``: the embedding and the per-image caches, as computed one by one."""
    cfg, params = setup
    model, c, _ = _inputs(cfg, params, batch=1)
    ctx = jax.jit(
        lambda p: model.apply({"params": p}, c.image, c.valid_hw, c.radius, method=SamRef.prepare)
    )(params)
    np.testing.assert_allclose(ctx.embedding, c.embedding, atol=1e-5)
    bare = model.apply(
        {"params": params},
        c.image,
        c.valid_hw,
        c.radius,
        c.embedding,
        False,
        method=SamRef.prepare,
    )
    assert bare.image_pe is None and bare.global_context is None and bare.decoder_layer0 is None
    pe = model.apply({"params": params}, method=SamRef.dense_pe)
    np.testing.assert_allclose(ctx.image_pe, pe, atol=1e-6)
    assert sorted(ctx.decoder_layer0) == ["i2t_q", "t2i_k", "t2i_v"]


def test_bf16_close_to_fp32(setup):
    cfg, params = setup
    _, c, x = _inputs(cfg, params)
    bf = ml_collections.ConfigDict(cfg.to_dict())
    bf.refiners.global_diff.dtype = "bfloat16"
    bf.refiners.patch_diff.dtype = "bfloat16"
    m32 = SamRef(ml_collections.FrozenConfigDict(cfg))
    m16 = SamRef(ml_collections.FrozenConfigDict(bf), dtype=jnp.bfloat16)
    o32 = jax.jit(_click(m32, "full"))(params, c, x)
    o16 = jax.jit(_click(m16, "full"))(params, c, x)
    a, b = np.asarray(o32.final_logits), np.asarray(o16.final_logits, np.float32)
    assert np.abs(a - b).max() <= 0.1 * np.abs(a).max() + 0.1
    assert ((a > 0) == (b > 0)).mean() >= 0.97


# ------------------------------------------------------------------ predictor + checkpoint
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, setup):
    cfg, params = setup
    d = tmp_path_factory.mktemp("samref") / "ck"
    save_samref(d, params, cfg)
    return d


def test_checkpoint_roundtrip_and_sam_only_warning(ckpt, setup, tmp_path):
    cfg, params = setup
    loaded, cfg2, _ = load_samref(ckpt)
    assert cfg2.max_clicks == cfg.max_clicks
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # SAM-only (what convert_weights.py writes): refiners are initialised, with a warning.
    from dataclasses import asdict

    from samref_jax.sam import sam_config

    save_model_checkpoint(
        tmp_path / "samonly",
        {"sam": params["sam"]},
        {"model_type": "tiny", "sam_config": asdict(sam_config("tiny"))},
    )
    with pytest.warns(UserWarning, match="no refiner weights"):
        p2, _, _ = load_samref(tmp_path / "samonly")
    assert set(p2) == {"sam", "global_diff", "patch_diff"}
    with pytest.raises(CheckpointError, match="does not exist"):
        load_samref(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a samref-jax checkpoint"):
        load_samref(tmp_path / "empty")


def test_predictor_click_undo_reset(ckpt):
    p = SamRefPredictor.from_checkpoint(ckpt, mode="full")
    img = np.random.RandomState(0).randint(0, 255, (60, 80, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="set an image"):
        p.click(1, 1)
    p.set_image(img)
    a = p.click(40, 30)
    assert a.mask.shape == (60, 80) and a.mask.dtype == bool
    assert a.sam_mask.shape == a.global_mask.shape == (60, 80)
    x0, y0, x1, y1 = a.window
    assert 0 <= x0 <= 40 <= x1 <= 80 and 0 <= y0 <= 30 <= y1 <= 60
    b = p.click(10, 10, positive=False)
    assert len(p.clicks) == 2 and p.clicks[1] == (10.0, 10.0, False)
    # New parameters: the image is re-embedded and GlobalDiff's cached inputs follow (the
    # same result as a fresh predictor); the clicks are kept.
    old_params = p.params
    p.params = jax.tree_util.tree_map(lambda v: v * 1.5, old_params)
    assert len(p.clicks) == 2
    fresh = SamRefPredictor(p.params, p.config, mode="full")
    fresh.set_image(img)
    history = p._history
    p.reset()
    np.testing.assert_array_equal(p.click(40, 30).logits, fresh.click(40, 30).logits)
    p.params = old_params
    p._history = history
    back = p.undo()
    np.testing.assert_array_equal(back.mask, a.mask)
    for x, y in [(-1, 5), (80, 5), (5, 60), (float("nan"), 1)]:
        with pytest.raises(ValueError, match="outside the image"):
            p.click(x, y)
    assert len(p.clicks) == 1
    # A fork: same image and embedding, its own clicks and mode; the original is untouched.
    q = p.fork("sam")
    assert q.embedding is p.embedding and q.mode == "sam" and p.mode == "full"
    assert q.context is p.context  # the image context is computed once per image
    assert q.click(20, 20).window is None and len(q.clicks) == 2 and len(p.clicks) == 1
    q.reset()
    assert len(p.clicks) == 1
    p.reset()
    assert p.clicks == []
    p.set_mode("sam")
    c = p.click(40, 30)
    assert c.window is None
    with pytest.raises(ValueError, match="mode must be"):
        p.set_mode("fast")
    p.set_image(np.random.RandomState(1).randint(0, 65535, (50, 40), dtype=np.uint16))
    assert p.click(5, 5).mask.shape == (50, 40)
    del b
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError):
            p.set_image(np.zeros((5, 5, 2), np.uint8))


def test_predictor_prepare_image(ckpt):
    # prepare_image computes the next image's per-image work without touching the current one;
    # set_image takes its result and gives what set_image(image) gives.
    p = SamRefPredictor.from_checkpoint(ckpt, mode="full")
    rng = np.random.RandomState(0)
    img = rng.randint(0, 255, (60, 80, 3), dtype=np.uint8)
    img2 = rng.randint(0, 255, (70, 50, 3), dtype=np.uint8)
    p.set_image(img)
    a = p.click(40, 30)
    nxt = p.prepare_image(img2)
    assert nxt.original_size == (70, 50) and p.original_size == (60, 80) and len(p.clicks) == 1
    p.reset()
    np.testing.assert_array_equal(p.click(40, 30).logits, a.logits)  # image untouched
    p.set_image(nxt)
    assert p.clicks == [] and p.embedding is nxt.embedding
    fresh = SamRefPredictor(p.params, p.config, mode="full")
    fresh.set_image(img2)
    np.testing.assert_array_equal(p.click(20, 30).logits, fresh.click(20, 30).logits)
    # Prepared before new parameters were set: set_image recomputes it with the new ones.
    old = p.prepare_image(img)
    p.params = jax.tree_util.tree_map(lambda v: v * 1.5, p.params)
    p.set_image(old)
    assert p.embedding is not old.embedding
    fresh = SamRefPredictor(p.params, p.config, mode="full")
    fresh.set_image(img)
    np.testing.assert_array_equal(p.click(40, 30).logits, fresh.click(40, 30).logits)
    with pytest.raises(ValueError):
        p.prepare_image(np.zeros((5, 5, 2), np.uint8))
