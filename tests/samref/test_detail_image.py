"""PatchDiff's image source above the frame (``refiners.patch_diff.image_scale`` k > 1): the
model reads the detail image, untrained refiners still return SAM's logits, the predictor builds
the copy from the original image, the pipeline makes it and the training step takes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from samref_jax.samref.model import ClickState, SamRef, detail_scale
from samref_jax.training import pipeline as P
from samref_jax.training import step as S
from samref_jax.training.testing import synthetic_batch, tiny_test_config

FRAME = 64
K = 2


def _key(seed: int = 0):
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_test_config("full", FRAME, rounds=2)
    cfg.model.refiners.patch_diff.image_scale = K
    params = S.init_params(cfg, _key(0))
    return cfg, params


def _ctx_state(cfg, params, seed=0):
    rng = np.random.default_rng(seed)
    model = SamRef(ml_collections.FrozenConfigDict(cfg.model))
    detail = jnp.asarray(rng.normal(size=(1, K * FRAME, K * FRAME, 3)), jnp.float32)
    image = jax.image.resize(detail, (1, FRAME, FRAME, 3), "linear")
    ctx = model.apply(
        {"params": params},
        image,
        jnp.asarray([[FRAME, 48]], jnp.int32),
        jnp.asarray([2.0]),
        detail_image=detail,
        method=SamRef.prepare,
    )
    state = ClickState.empty(cfg.model).add_click(jnp.asarray([[20.0, 30.0]]), jnp.ones(1))
    return model, ctx, state


def _perturbed(params):
    p = jax.tree.map(lambda a: a, params)
    head = p["patch_diff"]["refiner"]["detail_head"]
    head["kernel"] = head["kernel"] + 0.05
    return p


def test_patch_diff_reads_the_detail_image(setup):
    cfg, params = setup
    assert detail_scale(cfg.model) == K
    model, ctx, state = _ctx_state(cfg, params)
    click = jax.jit(lambda p, c, s: model.apply({"params": p}, c, s, "full", method=SamRef.click))
    # Untrained refiners (zero detail heads) return SAM's logits exactly, at any image scale.
    out, _ = click(params, ctx, state)
    np.testing.assert_array_equal(out.final_logits, out.sam_logits)
    # With heads off zero, another detail image gives another final mask inside the window.
    p = _perturbed(params)
    a, _ = click(p, ctx, state)
    b, _ = click(p, ctx._replace(detail_image=ctx.detail_image[:, ::-1]), state)
    assert np.abs(np.asarray(a.final_logits) - np.asarray(b.final_logits)).max() > 1e-4
    np.testing.assert_array_equal(a.global_logits, b.global_logits)  # GlobalDiff: the frame
    with pytest.raises(ValueError, match="image_scale=2 needs a detail image"):
        click(p, ctx._replace(detail_image=None), state)


def test_predictor_builds_the_detail_image_from_the_original(setup):
    from samref_jax.samref.predictor import SamRefPredictor

    cfg, params = setup
    pred = SamRefPredictor(params, cfg.model, mode="full")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (150, 200, 3), np.uint8)
    pred.set_image(img)
    d = pred.context.detail_image
    assert d.shape == (1, K * FRAME, K * FRAME, 3)
    # 200 wide -> 128 x 96 in the detail image (64 x 48 in the frame), zero padding after.
    assert np.abs(np.asarray(d[0, :96, :128])).sum() > 0
    assert not np.asarray(d[0, 96:]).any() and not np.asarray(d[0, :, 128:]).any()
    r = pred.click(100, 75)
    assert r.mask.shape == (150, 200)


def test_pipeline_detail_example_lines_up():
    rng = np.random.default_rng(3)
    frame = 16
    img = rng.integers(0, 255, (2 * frame, 2 * frame, 3), np.uint8)
    gt = np.full((2 * frame, 2 * frame), -1, np.int8)
    gt[:27, :31] = 0
    gt[6:20, 8:24] = 1
    ex = {
        "image": img,
        "gt": gt,
        "valid_hw": np.array([27, 31], np.int32),
        "first_click": np.array([10, 10], np.int32),
        "radius": np.float32(4.0),
    }
    out = P.detail_example(ex, rng, frame, 2, 0.5)
    assert out["image"].shape == (frame, frame, 3) and out["detail_image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(out["valid_hw"], [13, 15])  # trimmed to a multiple of k
    assert not out["detail_image"][26:].any() and not out["detail_image"][:, 30:].any()
    np.testing.assert_array_equal(out["gt"][:13, :15], gt[1:26:2, 1:30:2])
    assert (out["gt"][13:] == -1).all() and (out["gt"][:, 15:] == -1).all()
    cy, cx = out["first_click"]
    assert out["gt"][cy, cx] == 1 and out["radius"] == 2.0
    # The frame image is the detail image resized (as the predictor resizes the original).
    want = P._resize(np.ascontiguousarray(out["detail_image"][:26, :30]), (13, 15), False)
    np.testing.assert_array_equal(out["image"][:13, :15], want)


@pytest.mark.slow
def test_training_step_takes_the_detail_image(setup):
    cfg, params = setup
    batch = synthetic_batch(2, FRAME, seed=1)
    big = synthetic_batch(2, K * FRAME, seed=1)
    batch["detail_image"] = big["image"]
    fn = jax.jit(S.make_grad_fn(cfg))
    loss, _, grads = fn(_perturbed(params), batch, jnp.ones((2,)))
    assert np.isfinite(float(loss))
    g = jax.tree_util.tree_leaves(grads["patch_diff"])
    assert all(np.isfinite(np.asarray(x)).all() for x in g)
    # The detail image reaches the loss: another one gives another loss.
    batch2 = dict(batch, detail_image=big["image"][:, ::-1])
    assert float(fn(_perturbed(params), batch2, jnp.ones((2,)))[0]) != float(loss)
