"""Tests for samref_jax.refiners (small frames, small widths; CPU-friendly)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samref_jax.refiners import (
    DiffRefiner,
    GlobalDiff,
    PatchDiff,
    batch_disk_maps,
    clicks_to_patch,
    crop_patch,
    crop_patches,
    default_global_diff_config,
    default_patch_diff_config,
    default_refiner_config,
    default_refiners_config,
    default_window_config,
    disk_maps,
    inside_window,
    paste_patch,
    patch_radius,
    scale_clicks,
    select_window,
)

B, H, W = 2, 64, 64
EMB = (8, 8, 16)  # stride 8 embedding of the 64 frame
P = 32


def _small_global_cfg(**kw):
    # The blended design (D = head, G ~= 0.982 S at init) without the previous-mask channel;
    # the defaults (residual detail, previous-mask input) are tested on their own below.
    cfg = default_global_diff_config()
    cfg.width = 8
    cfg.num_groups = 4
    cfg.blocks_before = cfg.blocks_after = 1
    cfg.detail_residual = False
    cfg.prev_mask_input = False
    cfg.update(kw)
    return cfg


def _small_patch_cfg(**kw):
    cfg = default_patch_diff_config()
    cfg.width = 8
    cfg.num_groups = 4
    cfg.blocks_before = cfg.blocks_after = 1
    cfg.patch_size = P
    cfg.min_side = 8.0
    cfg.embed_patch_size = 4
    cfg.detail_residual = False
    cfg.prev_mask_input = False
    cfg.update(kw)
    return cfg


def _key(seed):
    # threefry compiles take seconds per new shape on this CPU; rbg keys compile fast
    return jax.random.key(seed, impl="rbg")


def _smooth_logits(rng, b=B, h=H, w=W):
    """Smooth signed-distance-like logits of random discs, roughly in [-20, 20]."""
    ctr = jnp.asarray(rng.uniform(0.3, 0.7, (b, 2)) * np.array([w, h]), jnp.float32)
    rad = jnp.asarray(rng.uniform(0.15, 0.3, (b,)) * h, jnp.float32)
    ys, xs = jnp.mgrid[0:h, 0:w].astype(jnp.float32)
    d = jnp.sqrt((xs - ctr[:, 0, None, None]) ** 2 + (ys - ctr[:, 1, None, None]) ** 2)
    return jnp.clip(rad[:, None, None] - d, -20.0, 20.0)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = jnp.asarray(rng.standard_normal((B, H, W, 3)), jnp.float32)
    coarse = _smooth_logits(rng)
    emb = jnp.asarray(rng.standard_normal((B, *EMB)), jnp.float32)
    coords = jnp.array(
        [[[30.0, 31.0], [10.0, 50.0], [0.0, 0.0]], [[20.0, 25.0], [40.0, 40.0], [5.0, 5.0]]]
    )
    labels = jnp.array([[1, 0, -1], [1, 1, 0]], jnp.int32)
    radius = jnp.array([3.0, 2.0])
    return image, coords, labels, coarse, emb, radius


# ----------------------------------------------------------------------------- disk maps


@pytest.mark.parametrize("radius,count", [(0.0, 1), (1.0, 5), (2.0, 13), (3.0, 29), (5.0, 81)])
def test_disk_maps_pixel_counts(radius, count):
    coords = jnp.array([[30.0, 20.0], [5.0, 50.0], [40.0, 40.0]])
    labels = jnp.array([1, 0, -1])
    for fn in (disk_maps, jax.jit(disk_maps, static_argnums=(2, 3))):
        d = fn(coords, labels, 64, 64, jnp.float32(radius))
        chex.assert_shape(d, (64, 64, 2))
        chex.assert_type(d, jnp.float32)
        assert int(d[..., 0].sum()) == count
        assert int(d[..., 1].sum()) == count
        assert float(d[20, 30, 0]) == 1.0 and float(d[50, 5, 1]) == 1.0  # (row y, col x)
        assert float(d[40, 40].sum()) == 0.0  # padding click ignored


def test_disk_maps_padding_only_and_batched():
    coords = jnp.zeros((2, 3, 2))
    labels = jnp.full((2, 3), -1)
    d = batch_disk_maps(coords, labels, 16, 24, jnp.array([3.0, 4.0]))
    chex.assert_shape(d, (2, 16, 24, 2))
    assert float(d.sum()) == 0.0
    labels = labels.at[1, 0].set(1)
    d = jax.jit(batch_disk_maps, static_argnums=(2, 3))(coords, labels, 16, 24, 2.0)
    assert float(d[0].sum()) == 0.0
    assert int(d[1, ..., 0].sum()) == 6  # quarter disk of radius 2 at the corner (0, 0)


def test_scale_clicks():
    c = jnp.array([[0.0, 0.0], [9.0, 4.0]])
    out = scale_clicks(c, (5, 10), (10, 20))
    np.testing.assert_allclose(out, [[0.5, 0.5], [18.5, 8.5]])
    np.testing.assert_allclose(
        scale_clicks(c, (5, 10), (10, 20), half_pixel=False), [[0.0, 0.0], [18.0, 8.0]]
    )


# ----------------------------------------------------------------------------- window


def _wcfg(**kw):
    cfg = default_window_config()
    cfg.min_side = 16.0
    cfg.update(kw)
    return cfg


def _box_mask(x0, y0, x1, y1, h=128, w=128):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return jnp.asarray(m)


def _contains(win, xy):
    return (win[0] <= xy[0] + 0.5 < win[2]) and (win[1] <= xy[1] + 0.5 < win[3])


def test_window_no_change_is_expanded_square_on_click():
    cfg = _wcfg()
    obj = _box_mask(20, 30, 100, 90)  # 80 x 60 object -> L = 0.4 * 80 = 32
    click = jnp.array([60.0, 60.0])
    win = select_window(obj, obj, click, jnp.array([128, 128]), cfg)
    chex.assert_shape(win, (4,))
    chex.assert_type(win, jnp.float32)
    side = 1.4 * 32.0
    np.testing.assert_allclose(
        win, [60.5 - side / 2, 60.5 - side / 2, 60.5 + side / 2, 60.5 + side / 2], atol=1e-4
    )


def test_window_diff_bbox_expanded():
    cfg = _wcfg()
    prev = _box_mask(20, 20, 100, 100)  # 80x80 object -> L = 32, neighbourhood +-16 of click
    new = _box_mask(20, 20, 100, 100) | _box_mask(100, 50, 106, 58)  # diff 6 x 8, near click
    click = jnp.array([101.0, 52.0])
    win = np.asarray(select_window(prev, new, click, jnp.array([128, 128]), cfg))
    # bbox [100, 50, 106, 58] -> square side 8 -> x1.4 = 11.2 < min_side 16 -> 16
    np.testing.assert_allclose(win, [103 - 8, 54 - 8, 103 + 8, 54 + 8], atol=1e-4)
    cfg.min_side = 4.0
    win = np.asarray(select_window(prev, new, click, jnp.array([128, 128]), cfg))
    np.testing.assert_allclose(win[2] - win[0], 8 * 1.4, atol=1e-4)
    np.testing.assert_allclose((win[0] + win[2]) / 2, 103.0, atol=1e-4)
    # diff outside the neighbourhood is ignored
    new2 = new | _box_mask(0, 0, 5, 5)
    win2 = np.asarray(select_window(prev, new2, click, jnp.array([128, 128]), cfg))
    np.testing.assert_allclose(win2, win, atol=1e-5)


def test_window_first_click_and_empty_masks():
    cfg = _wcfg()
    empty = jnp.zeros((128, 128), bool)
    new = _box_mask(40, 40, 80, 80)  # first click: prev empty, diff = the object
    click = jnp.array([60.0, 60.0])
    win = np.asarray(select_window(empty, new, click, jnp.array([128, 128]), cfg))
    assert _contains(win, click)
    # L = max(16, 0.4 * 40) = 16; neighbourhood [52.5, 68.5] clips the object -> pixels 52..68
    np.testing.assert_allclose(win, [60.5 - 11.9, 60.5 - 11.9, 60.5 + 11.9, 60.5 + 11.9], atol=1e-4)
    # nothing anywhere: square of min_side around the click, expanded
    win = np.asarray(select_window(empty, empty, click, jnp.array([128, 128]), cfg))
    np.testing.assert_allclose(win, [60.5 - 11.2, 60.5 - 11.2, 60.5 + 11.2, 60.5 + 11.2], atol=1e-4)


def test_window_clipped_to_valid_area_and_contains_click():
    cfg = _wcfg()
    obj = _box_mask(0, 0, 90, 60)
    click = jnp.array([88.0, 58.0])  # near the valid corner (valid = 60 x 90)
    win = np.asarray(select_window(obj, obj, click, jnp.array([60, 90]), cfg))
    assert win[0] >= 0 and win[1] >= 0 and win[2] <= 90 and win[3] <= 60
    assert _contains(win, click)
    np.testing.assert_allclose(win[2] - win[0], 1.4 * 36, atol=1e-4)  # shifted, not shrunk
    # valid area smaller than min side: the whole valid area
    cfg.min_side = 64.0
    win = np.asarray(select_window(obj, obj, jnp.array([3.0, 3.0]), jnp.array([20, 30]), cfg))
    np.testing.assert_allclose(win, [0, 0, 30, 20])


def test_window_random_properties():
    cfg = _wcfg(min_side=24.0)
    n = 64
    rng = np.random.default_rng(3)
    prev = rng.uniform(size=(n, 128, 128)) < rng.uniform(size=(n, 1, 1)) * 0.05
    prev[: n // 4] = False  # first clicks
    new = rng.uniform(size=(n, 128, 128)) < rng.uniform(size=(n, 1, 1)) * 0.05
    new[n // 4 : n // 2] = prev[n // 4 : n // 2]  # no change
    new[-2:] = False  # empty new mask
    valid = rng.integers(10, 129, (n, 2)).astype(np.int32)
    click = (rng.uniform(size=(n, 2)) * valid[:, ::-1] - 0.5).astype(np.float32)
    sel = jax.jit(jax.vmap(lambda a, b_, c, v: select_window(a, b_, c, v, cfg)))
    wins = np.asarray(sel(prev, new, click, valid))
    for i in (0, n // 4, n - 1):  # jit + vmap == eager single sample
        eager = select_window(prev[i], new[i], click[i], valid[i], cfg)
        np.testing.assert_allclose(wins[i], eager, atol=1e-4)
    click, valid = np.asarray(click), np.asarray(valid)
    for win, c, v in zip(wins, click, valid, strict=True):
        assert _contains(win, np.floor(c + 0.5))
        assert win[0] >= 0 and win[1] >= 0
        assert win[2] <= v[1] + 1e-4 and win[3] <= v[0] + 1e-4
        assert win[2] - win[0] >= min(24.0, v[1]) - 1e-4
        assert win[3] - win[1] >= min(24.0, v[0]) - 1e-4


# ----------------------------------------------------------------------------- crop / paste


def test_crop_identity_and_linear_ramp():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 16, 3)), jnp.float32)
    full = jnp.array([0.0, 0.0, 16.0, 16.0])
    np.testing.assert_allclose(crop_patch(x, full, 16), x, atol=1e-6)
    # a map whose value is its pixel-centre frame coordinate (stride 4): crops are linear
    emb = (jnp.arange(8, dtype=jnp.float32) + 0.5) * 4.0
    emb = jnp.stack(jnp.broadcast_arrays(emb[None, :], emb[:, None]), -1)  # (8, 8, 2) = (x, y)
    win = jnp.array([6.0, 10.0, 22.0, 18.0])
    for fn in (crop_patch, jax.jit(crop_patch, static_argnums=(2, 3, 4))):
        out = fn(emb, win, 4, 4.0, 2)
        chex.assert_shape(out, (4, 4, 2))
        np.testing.assert_allclose(out[0, :, 0], [8.0, 12.0, 16.0, 20.0], atol=1e-5)
        np.testing.assert_allclose(out[:, 0, 1], [11.0, 13.0, 15.0, 17.0], atol=1e-5)


def test_paste_outside_bit_identical_and_roundtrip():
    rng = np.random.default_rng(1)
    full = jnp.asarray(rng.standard_normal((64, 64)) * 1e3, jnp.float32)
    patch = jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)
    win = jnp.array([7.3, 5.1, 29.9, 50.2])
    inside = np.asarray(inside_window(win, 64, 64))
    jpaste = jax.jit(paste_patch, static_argnums=3)
    outs = [
        paste_patch(full, patch, win),
        jpaste(full, patch, win, False),
        jpaste(full, patch, win, True),
    ]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-3)
    for out in outs:
        out = np.asarray(out)
        chex.assert_shape(out, (64, 64))
        assert out.dtype == full.dtype
        np.testing.assert_array_equal(out[~inside], np.asarray(full)[~inside])
        assert np.abs(out[inside] - np.asarray(full)[inside]).min() > 0
    # 1:1 integer window: crop is an exact slice and crop then paste is exact inside
    win = jnp.array([10.0, 4.0, 42.0, 36.0])
    cropped = crop_patch(full, win, 32)
    np.testing.assert_allclose(cropped, full[4:36, 10:42], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(
        paste_patch(jnp.zeros_like(full), cropped, win)[4:36, 10:42],
        full[4:36, 10:42],
        rtol=1e-5,
        atol=1e-3,
    )
    # channels
    full3 = jnp.stack([full] * 3, -1)
    out3 = paste_patch(full3, jnp.stack([patch] * 3, -1), win)
    chex.assert_shape(out3, (64, 64, 3))
    np.testing.assert_array_equal(out3[..., 1], paste_patch(full, patch, win))


def test_clicks_to_patch_and_radius():
    win = jnp.array([10.0, 20.0, 42.0, 52.0])  # side 32 -> P = 64: scale 2
    c = clicks_to_patch(jnp.array([[9.5, 19.5], [25.5, 35.5]]), win, 64)
    np.testing.assert_allclose(c, [[-0.5, -0.5], [31.5, 31.5]])
    np.testing.assert_allclose(patch_radius(jnp.float32(5.0), win, 64), 10.0)
    # a disk drawn in the patch coincides with the cropped frame disk
    click = jnp.array([[25.0, 33.0]])
    frame = disk_maps(click, jnp.array([1]), 64, 64, 6.0)[..., 0]
    cp = crop_patch(frame, win, 64)
    dp = disk_maps(
        clicks_to_patch(click, win, 64), jnp.array([1]), 64, 64, patch_radius(6.0, win, 64)
    )[..., 0]
    assert np.mean(np.asarray(cp > 0.5) != np.asarray(dp > 0.5)) < 0.02


# ----------------------------------------------------------------------------- refiners


def test_default_configs():
    cfg = default_refiner_config()
    assert cfg.width == 32 and cfg.blocks_before == 2 and cfg.blocks_after == 2
    assert cfg.error_bias_init == -4.0 and cfg.input_size is None and cfg.dtype == "float32"
    assert cfg.detail_residual and cfg.prev_mask_input
    pcfg = default_patch_diff_config()
    assert pcfg.patch_size == 256 and pcfg.expand == 1.4 and pcfg.object_frac == 0.4
    assert pcfg.min_side == 64.0 and pcfg.width == 32
    both = default_refiners_config()
    assert set(both.keys()) == {"global_diff", "patch_diff"}


def _check_refiner_out(out, shape):
    for a in out:
        chex.assert_shape(a, shape)
        chex.assert_type(a, jnp.float32)
        chex.assert_tree_all_finite(a)


def _patch_args(seed=0, prev=None):
    image, coords, labels, coarse, emb, radius = _inputs(seed)
    prev = jnp.full((B, H, W), -20.0) if prev is None else prev
    last = coords[:, 0]
    valid = jnp.array([[64, 64], [48, 60]], jnp.int32)
    return image, coords, labels, coarse, prev, emb, radius, last, valid


@pytest.fixture(scope="module")
def global_setup():
    inputs = _inputs()
    model = GlobalDiff(_small_global_cfg())
    params = jax.jit(model.init)(_key(1), *inputs)
    return model, params, inputs


@pytest.fixture(scope="module")
def patch_setup():
    args = _patch_args()
    model = PatchDiff(_small_patch_cfg())
    params = jax.jit(model.init)(_key(2), *args)
    return model, params, args


@pytest.fixture(scope="module")
def jit_run(global_setup, patch_setup):
    """One jit compile: loss gradients w.r.t. both refiners plus both forward outputs.

    PatchDiff consumes the untrained GlobalDiff logits ~= S (its input ``args[3]``).
    """
    gmodel, gp, (image, coords, labels, coarse, emb, radius) = global_setup
    pmodel, pp, pargs = patch_setup
    target = jnp.asarray(np.random.default_rng(9).uniform(size=(B, H, W)) > 0.5, jnp.float32)

    def loss(params):
        gout = gmodel.apply(params["g"], image, coords, labels, coarse, emb, radius)
        pout = pmodel.apply(
            params["p"],
            image,
            coords,
            labels,
            gout.logits,
            pargs[4],
            emb,
            radius,
            pargs[7],
            pargs[8],
        )
        bce = lambda z, t: jnp.mean(jnp.logaddexp(0.0, z) - z * t)
        value = (
            bce(gout.logits, target)
            + bce(pout.logits, target)
            + bce(gout.error_logits, target)
            + bce(pout.patch_error_logits, 1.0)
        )
        return value, (gout, pout)

    (_, (gout, pout)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))({"g": gp, "p": pp})
    return gout, pout, grads


def _assert_identity_at_init(logits, coarse):
    # G = S + sigmoid(Err) (D - S), sigmoid(-4) = 0.018, D ~ 0 -> |G - S| <= 2.5 % |S| + 0.01
    err = np.abs(np.asarray(logits - coarse))
    assert np.all(err <= 0.025 * np.abs(np.asarray(coarse)) + 0.01), err.max()


def test_global_diff_shapes_jit_and_identity_at_init(global_setup, jit_run):
    model, params, inputs = global_setup
    assert set(params.keys()) == {"params"}  # no mutable (BatchNorm-like) state
    out = model.apply(params, *inputs)
    out_jit = jit_run[0]
    _check_refiner_out(out, (B, H, W))
    chex.assert_trees_all_close(out, out_jit, atol=1e-4, rtol=1e-4)
    _assert_identity_at_init(out.logits, inputs[3])
    # detail_residual (same parameter tree): D = S + d -> G ~= S almost exactly
    res = GlobalDiff(_small_global_cfg(detail_residual=True)).apply(params, *inputs)
    assert float(jnp.abs(res.logits - inputs[3]).max()) < 0.01


def test_global_diff_layernorm_relu_input_size():
    inputs = _inputs(1)
    model = GlobalDiff(_small_global_cfg(norm="layer", act="relu", input_size=32))
    params = jax.jit(model.init)(_key(3), *inputs)
    out = jax.jit(model.apply)(params, *inputs)
    _check_refiner_out(out, (B, H, W))
    _assert_identity_at_init(out.logits, inputs[3])


@pytest.mark.parametrize("mode", ["residual", "replace"])
def test_patch_diff_shapes_jit_identity_and_outside(mode, patch_setup, jit_run):
    _, params, args = patch_setup
    # jit only: its parts (select_window, crop, paste, disks, DiffRefiner) are checked
    # jit == no-jit separately; an eager PatchDiff costs ~15 s of op-by-op compiles here.
    if mode == "residual":
        out = jit_run[1]
        g = np.asarray(jit_run[0].logits)  # its global input (untrained GlobalDiff output)
    else:
        out = jax.jit(PatchDiff(_small_patch_cfg(paste_mode=mode)).apply)(params, *args)
        g = np.asarray(args[3])
    chex.assert_shape(out.logits, (B, H, W))
    chex.assert_shape(out.window, (B, 4))
    for a in (out.patch_logits, out.patch_detail, out.patch_error_logits, out.patch_coarse):
        chex.assert_shape(a, (B, P, P))
    chex.assert_type(list(out), jnp.float32)
    chex.assert_tree_all_finite(out)
    for b in range(B):
        win = np.asarray(out.window[b])
        assert _contains(win, np.asarray(args[7][b]))
        assert win[2] <= args[8][b, 1] and win[3] <= args[8][b, 0]
        inside = np.asarray(inside_window(out.window[b], H, W))
        np.testing.assert_array_equal(np.asarray(out.logits[b])[~inside], g[b][~inside])
    # untrained: F ~= G (residual: 2.5 % |G| + 0.02; replace adds crop/paste resampling error)
    tol = 0.025 * np.abs(g) + (0.02 if mode == "residual" else 1.0)
    assert np.all(np.abs(np.asarray(out.logits) - g) <= tol)
    _assert_identity_at_init(out.patch_logits, out.patch_coarse)
    # ground-truth crop helper
    gt = crop_patches((jnp.asarray(g) > 0).astype(jnp.float32), out.window, P) > 0.5
    chex.assert_shape(gt, (B, P, P))
    assert np.mean(np.asarray(gt) == np.asarray(out.patch_coarse > 0)) > 0.97


def test_gradients_reach_every_parameter(global_setup, patch_setup, jit_run):
    grads = jit_run[2]
    n_leaves = len(jax.tree.leaves(grads))
    assert n_leaves == len(jax.tree.leaves(global_setup[1])) + len(jax.tree.leaves(patch_setup[1]))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
    assert not zero, f"all-zero gradient leaves: {zero}"
    assert all(np.all(np.isfinite(np.asarray(g))) for _, g in flat)


def test_bf16_close_to_fp32(global_setup):
    _, params, (image, coords, labels, coarse, emb, radius) = global_setup
    disks = batch_disk_maps(coords, labels, H, W, radius)
    # make the heads matter so the comparison is not trivially S vs S
    rp = jax.tree.map(lambda x: x, params["params"]["refiner"])
    rp["detail_head"]["kernel"] = rp["detail_head"]["kernel"] * 100.0
    rp["error_head"]["kernel"] = rp["error_head"]["kernel"] * 100.0
    rp["error_head"]["bias"] = jnp.zeros_like(rp["error_head"]["bias"])
    rp = {"params": rp}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(rp))
    o32 = DiffRefiner(_small_global_cfg()).apply(rp, image, disks, coarse, emb)  # eager
    o16 = jax.jit(DiffRefiner(_small_global_cfg(dtype="bfloat16")).apply)(
        rp, image, disks, coarse, emb
    )
    _check_refiner_out(o16, (B, H, W))
    assert float(jnp.abs(o32.detail).std()) > 0.1  # the heads are not negligible
    for a, b in zip(o32, o16, strict=True):
        scale = float(jnp.abs(a).max())
        assert float(jnp.abs(a - b).max()) <= 0.05 * scale + 0.05


@pytest.mark.parametrize("jit", [False, True])
def test_fused_layers_match_flax_reference(jit):
    """GroupNorm, DepthwiseConv, PointwiseConv (fast XLA:CPU forms) equal flax's layers."""
    import flax.linen as nn

    from samref_jax.refiners.refiner import DepthwiseConv, GroupNorm, PointwiseConv

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 12, 10, 16).astype(np.float32) * 3 + 1.5)
    pairs = [
        (GroupNorm(num_groups=4, epsilon=1e-5), nn.GroupNorm(num_groups=4, epsilon=1e-5), 1e-5),
        (DepthwiseConv(3), nn.Conv(16, (3, 3), padding="SAME", feature_group_count=16), 1e-5),
        (PointwiseConv(8), nn.Conv(8, (1, 1)), 1e-5),
    ]
    for ours, ref, tol in pairs:
        params = ref.init(_key(0), x)
        # random scale/bias/kernel: the initial ones (1, 0) would hide a mix-up
        params = jax.tree_util.tree_map(lambda a: a + jax.random.normal(_key(2), a.shape), params)
        chex.assert_trees_all_equal_shapes(ours.init(_key(0), x), params)
        f = lambda p, y, m=ours: m.apply(p, y)
        f = jax.jit(f) if jit else f
        np.testing.assert_allclose(f(params, x), ref.apply(params, x), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="groups"):
        GroupNorm(num_groups=3).init(_key(0), x)
    gn16 = GroupNorm(num_groups=4, dtype=jnp.bfloat16)
    y16 = gn16.apply(gn16.init(_key(0), x), x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y16, np.float32),
        nn.GroupNorm(num_groups=4).apply(nn.GroupNorm(num_groups=4).init(_key(0), x), x),
        atol=0.05,
    )


def test_default_refiners_return_sam_exactly_at_init():
    """Residual detail head starting at zero + previous-mask channel: G == S and F == G bit for
    bit, so a refiner stage on a frozen SAM starts from SAM's answer."""
    image, coords, labels, coarse, emb, radius = _inputs(2)
    prev = jnp.where(coarse > 0, 3.0, -3.0)
    gcfg = default_global_diff_config()
    gcfg.update(dict(width=8, num_groups=4, blocks_before=1, blocks_after=1))
    gm = GlobalDiff(gcfg)
    gp = jax.jit(gm.init)(_key(4), image, coords, labels, coarse, emb, radius, prev_logits=prev)
    g = jax.jit(gm.apply)(gp, image, coords, labels, coarse, emb, radius, prev_logits=prev)
    np.testing.assert_array_equal(np.asarray(g.logits), np.asarray(coarse))
    pcfg = _small_patch_cfg(detail_residual=True, prev_mask_input=True)
    pm = PatchDiff(pcfg)
    args = _patch_args(3, prev=prev)
    pp = jax.jit(pm.init)(_key(5), *args)
    out = jax.jit(pm.apply)(pp, *args)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(args[3]))
    # the previous mask is an input: once the heads are non-zero, changing it changes G
    rp = jax.tree.map(lambda x: x, gp)
    k = rp["params"]["refiner"]["detail_head"]["kernel"]
    rp["params"]["refiner"]["detail_head"]["kernel"] = k + 0.1
    a = jax.jit(gm.apply)(rp, image, coords, labels, coarse, emb, radius, prev_logits=prev)
    b = jax.jit(gm.apply)(rp, image, coords, labels, coarse, emb, radius, prev_logits=-prev)
    assert float(jnp.abs(a.logits - b.logits).max()) > 1e-3
