"""The click loop trains the refiners end to end: the refined logits of round t reach round t + 1
(the refiners' previous-mask input and SAM's next mask input), gradients included; refiners
compute in the training dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from samref_jax.model.config import sam_config_from
from samref_jax.model.samref import SamRef, next_mask_input
from samref_jax.training import step as S
from samref_jax.training.testing import synthetic_batch, tiny_test_config

FRAME = 64
ROUNDS = 3


def _key(seed: int = 0):
    return jax.random.key(seed, impl="rbg")


def _trained_like(params, seed: int = 1):
    """Params whose refiner heads are off zero (as after training): at init both refiners return
    SAM's logits exactly, which would hide what the refiners pass on."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: a, params)
    for name in ("global_diff", "patch_diff"):
        for head in ("detail_head", "error_head"):
            k = params[name]["refiner"][head]["kernel"]
            params[name]["refiner"][head]["kernel"] = k + jnp.asarray(
                rng.normal(0.0, 0.05, k.shape), k.dtype
            )
    return params


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_test_config("full", FRAME, rounds=ROUNDS)
    assert cfg.model.feedback == "refined"
    params = _trained_like(S.init_params(cfg, _key(0)))
    batch = synthetic_batch(2, FRAME, seed=5)
    return cfg, params, batch


def _config(cfg, **train):
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.train.update(train)
    return c


def test_next_mask_input_rule():
    low = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4)
    s = jnp.repeat(jnp.repeat(low, 4, 1), 4, 2)
    np.testing.assert_array_equal(next_mask_input(low, s, s, "refined"), low)  # F == S
    f = s.at[:, :4, :4].add(8.0)  # +8 on one 4 x 4 cell of the frame
    got = np.asarray(next_mask_input(low, s, f, "refined"))
    want = np.asarray(low).copy()
    want[:, 0, 0] += 8.0
    np.testing.assert_allclose(got, want)
    np.testing.assert_array_equal(next_mask_input(low, s, f, "sam"), low)
    with pytest.raises(ValueError, match="feedback"):
        next_mask_input(low, s, f, "bogus")


def test_last_round_loss_reaches_earlier_refiners(setup):
    """Loss on the last round only: the refiner gradients differ with the feedback under
    stop_gradient and without (they reach the earlier rounds' refiners only through it)."""
    cfg, params, batch = setup
    last = jnp.asarray([0.0] * (ROUNDS - 1) + [1.0])
    grads = {}
    for stop in (False, True):
        fn = S.make_grad_fn(_config(cfg, stop_grad_feedback=stop))
        _, _, g = fn(params, batch, last)
        grads[stop] = g
    for name in ("global_diff", "patch_diff"):
        a = jax.tree_util.tree_leaves(grads[False][name])
        b = jax.tree_util.tree_leaves(grads[True][name])
        diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))
        scale = max(float(jnp.max(jnp.abs(x))) for x in a)
        assert diff > 1e-3 * scale and diff > 1e-7, (name, diff, scale)


def test_finite_difference_through_three_rounds(setup):
    """d loss / d (GlobalDiff detail-head bias) through 3 unrolled rounds: analytic == central
    finite difference (the discrete clicks and windows do not move for a small step)."""
    cfg, params, batch = setup
    fn = jax.jit(S.make_grad_fn(cfg))
    w = jnp.ones((ROUNDS,))
    loss, _, grads = fn(params, batch, w)
    g = float(grads["global_diff"]["refiner"]["detail_head"]["bias"][0])
    assert abs(g) > 1e-4, g

    def loss_at(delta: float) -> float:
        p = jax.tree.map(lambda a: a, params)
        b = p["global_diff"]["refiner"]["detail_head"]["bias"]
        p["global_diff"]["refiner"]["detail_head"]["bias"] = b + delta
        return float(fn(p, batch, w)[0])

    eps = 2e-2
    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(fd - g) <= 0.03 * abs(g) + 1e-4, (fd, g)
    # the stop-gradient feedback gives a different (per-round only) gradient
    stop = jax.jit(S.make_grad_fn(_config(cfg, stop_grad_feedback=True)))
    g_stop = float(stop(params, batch, w)[2]["global_diff"]["refiner"]["detail_head"]["bias"][0])
    assert abs(g_stop - g) > 0.03 * abs(g), (g_stop, g)


def test_bf16_training_steps_refiners_in_bf16(setup):
    """train.dtype=bfloat16 runs the refiners in bf16 (params stay float32); a few training steps
    keep finite losses close to float32's."""
    cfg, params, batch = setup
    c16 = _config(cfg, dtype="bfloat16")
    model = S.model_of(c16)
    sc = sam_config_from(c16.model)
    ctx = model.apply(
        {"params": params},
        jnp.zeros((1, sc.img_size, sc.img_size, 3)),
        jnp.zeros((1, sc.image_embedding_size, sc.image_embedding_size, sc.prompt_embed_dim)),
        method=SamRef.global_context,
    )
    assert ctx.embedding.dtype == jnp.bfloat16
    losses = {}
    for name, c in (("f32", cfg), ("bf16", c16)):
        mesh = S.make_mesh(jax.devices()[:1])
        state = S.put_replicated(S.create_state(c, params, 0), mesh)
        step_fn = S.make_train_step(c, mesh, params, donate=False)
        b = S.shard_batch(batch, mesh)
        out = []
        for _ in range(3):
            state, m = step_fn(state, b)
            out.append(float(m["loss"]))
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
        losses[name] = np.asarray(out)
    assert np.all(np.isfinite(losses["bf16"])), losses
    np.testing.assert_allclose(losses["bf16"], losses["f32"], rtol=0.1)
