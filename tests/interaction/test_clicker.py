"""RITM click simulator: hand-made cases, brute force, and JAX == host on all GrabCut masks."""

from __future__ import annotations

import itertools
import textwrap

import jax
import numpy as np
import pytest
from scipy import ndimage

from samref_jax.data import read_folder_dataset
from samref_jax.interaction.clicker import (
    ClickState,
    has_error,
    max_sq_edt_bound,
    next_click,
    next_click_jax,
    squared_edt,
    squared_edt_jax,
)
from tests.fake_devices import run_script

next_click_jit = jax.jit(next_click_jax)


def _block(shape, y0, y1, x0, x1):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _brute_sq_edt(region: np.ndarray) -> np.ndarray:
    """Squared distance of every True pixel to the nearest False of the 1-px padded array."""
    padded = np.pad(region, 1)
    zy, zx = np.nonzero(~padded)
    out = np.zeros(region.shape, dtype=np.int64)
    for y, x in zip(*np.nonzero(region), strict=True):
        out[y, x] = ((zy - (y + 1)) ** 2 + (zx - (x + 1)) ** 2).min()
    return out


def _brute_click(gt, pred, clicked, ignore):
    valid = ~ignore
    dt_fn = _brute_sq_edt(gt & ~pred & valid) * ~clicked
    dt_fp = _brute_sq_edt(~gt & pred & valid) * ~clicked
    positive = dt_fn.max() > dt_fp.max()
    dt = dt_fn if positive else dt_fp
    ys, xs = np.nonzero(dt == dt.max())
    return int(ys[0]), int(xs[0]), bool(positive)


def _both(gt, pred, clicked=None, ignore=None):
    """Host click, after checking the JAX clicker agrees."""
    clicked = np.zeros_like(gt) if clicked is None else clicked
    host = next_click(gt, pred, clicked, ignore)
    valid = np.ones_like(gt) if ignore is None else ~ignore
    y, x, pos = next_click_jit(gt, pred, clicked, valid)
    assert (int(y), int(x), bool(pos)) == host
    return host


def test_block_center_positive():
    gt = _block((10, 10), 2, 7, 3, 8)  # 5x5 block, centre (4, 5) at distance 3
    assert _both(gt, np.zeros_like(gt)) == (4, 5, True)


def test_border_padding_and_row_major_tie():
    # All-object image, empty prediction: only the 1-px padding bounds the distances, so the
    # maximum (4 px) is the row y = 3, x in 3..5; the first in row-major order is (3, 3).
    gt = np.ones((7, 9), dtype=bool)
    assert _both(gt, np.zeros_like(gt)) == (3, 3, True)
    # Even size: distance 5 on rows/cols 4 and 5, first is (4, 4).
    gt = np.ones((10, 10), dtype=bool)
    assert _both(gt, np.zeros_like(gt)) == (4, 4, True)
    # A region touching the border: the padding is at distance 1 from the edge pixels.
    gt = _block((6, 12), 0, 6, 0, 3)  # 6x3 strip on the left edge
    assert _both(gt, np.zeros_like(gt)) == (1, 1, True)


def test_tie_gives_negative_click():
    gt = _block((5, 10), 1, 4, 1, 4)  # FN block, centre (2, 2), distance 2
    pred = _block((5, 10), 1, 4, 6, 9)  # FP block of the same size, centre (2, 7)
    assert _both(gt, pred) == (2, 7, False)
    # Strictly larger FN wins.
    gt = _block((7, 12), 1, 6, 1, 6)  # 5x5, distance 3
    pred = _block((7, 12), 1, 4, 8, 11)  # 3x3, distance 2
    assert _both(gt, pred) == (3, 3, True)


def test_clicked_pixels_are_skipped():
    gt = _block((10, 10), 2, 7, 3, 8)
    pred = np.zeros_like(gt)
    clicked = np.zeros_like(gt)
    clicked[4, 5] = True
    # Next best: distance 2 ring, first in row-major order.
    assert _both(gt, pred, clicked) == (3, 4, True)
    state = ClickState(gt.shape)
    assert state.next(gt, pred).xy == (5, 4)
    assert (state.next(gt, pred).y, state.clicks[-1].x) == (3, 4)
    assert state.points_xy.tolist() == [[5, 4], [4, 3]]
    assert state.labels.tolist() == [1, 1]
    state.reset()
    assert len(state) == 0 and not state.clicked.any()


def test_empty_error_regions_degenerate_click():
    gt = _block((8, 8), 2, 6, 2, 6)
    assert not has_error(gt, gt)
    assert _both(gt, gt.copy()) == (0, 0, False)  # documented: RITM's literal rule
    # All errors clicked: same degenerate click.
    pred = gt.copy()
    pred[3, 3] = False
    clicked = np.zeros_like(gt)
    clicked[3, 3] = True
    assert has_error(gt, pred)
    assert _both(gt, pred, clicked) == (0, 0, False)


def test_ignore_pixels_are_not_errors():
    gt = _block((9, 9), 1, 8, 1, 8)
    pred = np.zeros_like(gt)
    # Everything ignored: no error at all.
    assert _both(gt, pred, ignore=gt.copy()) == (0, 0, False)
    # An ignore column splits the 7x7 FN block: distances measured to the ignore pixels too.
    ignore = np.zeros_like(gt)
    ignore[:, 4] = True
    assert _both(gt, pred, ignore=ignore) == (2, 2, True)
    # Without it, the centre wins.
    assert _both(gt, pred) == (4, 4, True)


def test_random_cases_match_brute_force():
    rng = np.random.default_rng(0)
    edt = jax.jit(squared_edt_jax)
    shapes = [(9, 13), (13, 6), (1, 5)]  # few shapes: one compilation each
    for trial in range(60):
        h, w = shapes[trial % len(shapes)]
        # Blobby masks: smoothed noise, so regions have interiors.
        gt = ndimage.uniform_filter(rng.random((h, w)), 3) > 0.5
        pred = ndimage.uniform_filter(rng.random((h, w)), 3) > 0.5
        clicked = rng.random((h, w)) < 0.1
        ignore = rng.random((h, w)) < (0.1 if trial % 2 else 0.0)
        expected = _brute_click(gt, pred, clicked, ignore)
        assert _both(gt, pred, clicked, ignore) == expected, trial
        for region in (gt, pred):
            brute = _brute_sq_edt(region)
            np.testing.assert_array_equal(np.asarray(edt(region)), brute)
            np.testing.assert_array_equal(squared_edt(region), brute)


@pytest.mark.parametrize("case", ["all", "vertical band", "horizontal band", "disk", "none"])
def test_row_pass_stops_early_and_stays_exact(case):
    """The row pass stops once no pixel can improve: exact against scipy on regions that need
    every step (all pixels) and a few (bands, a disk), two per call (leading axes share it)."""
    h, w = 200, 230
    region = np.zeros((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    if case == "all":
        region[:] = True
    elif case == "vertical band":
        region[:, 40:49] = True
    elif case == "horizontal band":
        region[120:127, :] = True
    elif case == "disk":
        region = (yy - 90) ** 2 + (xx - 130) ** 2 < 70**2
    both = np.stack([region, np.roll(region, 17, axis=1)])
    want = [ndimage.distance_transform_edt(np.pad(r, 1))[1:-1, 1:-1] ** 2 for r in both]
    got = np.asarray(jax.jit(squared_edt_jax)(both))
    np.testing.assert_array_equal(got, np.rint(np.stack(want)).astype(np.int64))


def test_skipping_the_second_transform_gives_the_same_click():
    # next_click skips one region's EDT when a bounding-box bound on its maximum already decides
    # the sign; compare with always transforming both, on shapes that take every branch.
    def both_transforms(gt, pred, clicked):
        dt_fn = squared_edt(gt & ~pred) * ~clicked
        dt_fp = squared_edt(~gt & pred) * ~clicked
        positive = bool(dt_fn.max() > dt_fp.max())
        dt = dt_fn if positive else dt_fp
        y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
        return int(y), int(x), positive

    rng = np.random.default_rng(1)
    branches = set()
    for trial in range(300):
        h, w = rng.integers(5, 60, size=2)
        scale = int(rng.integers(1, 8))
        gt = ndimage.uniform_filter(rng.random((h, w)), scale) > rng.uniform(0.3, 0.7)
        pred = ndimage.uniform_filter(rng.random((h, w)), scale) > rng.uniform(0.3, 0.7)
        clicked = rng.random((h, w)) < rng.choice([0.0, 0.05, 0.5])
        for region in (gt, pred, gt & ~pred):
            assert squared_edt(region).max(initial=0) <= max_sq_edt_bound(region)
        fn_first = max_sq_edt_bound(gt & ~pred) >= max_sq_edt_bound(~gt & pred)
        expected = both_transforms(gt, pred, clicked)
        branches.add((fn_first, expected[2]))
        assert next_click(gt, pred, clicked) == expected, trial
    assert branches == {(True, True), (True, False), (False, True), (False, False)}


def test_max_sq_edt_bound_is_tight_for_squares():
    for side in range(1, 12):
        sq = np.zeros((side + 4, side + 4), bool)
        sq[2 : 2 + side, 2 : 2 + side] = True
        assert squared_edt(sq).max() == max_sq_edt_bound(sq) or side % 2 == 0
    assert max_sq_edt_bound(np.zeros((3, 3), bool)) == 0


def test_canvas_padding_and_vmap_give_the_same_click(grabcut_dir):
    ds = read_folder_dataset("GrabCut", grabcut_dir)
    canvas = (600, 640)
    batch, expected = [], []
    for i in (0, 7, 20):
        gt = ds[i]["gt"]
        obj, ign = gt == 1, gt == -1
        pred = ndimage.binary_erosion(obj, iterations=4)
        expected.append(next_click(obj, pred, np.zeros_like(obj), ign))
        pad = [(0, canvas[0] - gt.shape[0]), (0, canvas[1] - gt.shape[1])]
        batch.append(
            [np.pad(obj, pad), np.pad(pred, pad), np.zeros(canvas, bool), np.pad(~ign, pad)]
        )
    args = [np.stack(a) for a in zip(*batch, strict=True)]
    ys, xs, pos = jax.jit(jax.vmap(next_click_jax))(*args)
    got = [(int(y), int(x), bool(p)) for y, x, p in zip(ys, xs, pos, strict=True)]
    assert got == expected


def _predictions(obj: np.ndarray, i: int):
    """Synthetic predictions: eroded, dilated, shifted, empty, full."""
    yield "eroded", ndimage.binary_erosion(obj, iterations=6 + i % 5)
    yield "dilated", ndimage.binary_dilation(obj, iterations=6 + i % 7)
    dy, dx = 5 + i % 11, -(7 + i % 13)
    yield "shifted", np.roll(obj, (dy, dx), axis=(0, 1))
    yield "empty", np.zeros_like(obj)
    yield "full", np.ones_like(obj)


def test_jax_matches_host_on_all_grabcut_masks(grabcut_dir):
    """All 50 masks x 5 predictions (+ a second click for two of them).

    The two most common shapes (24 masks) run at their own shape; the other nine shapes run on
    one 600x640 canvas (image top-left, rest invalid), which keeps compilations to three.
    """
    ds = read_folder_dataset("GrabCut", grabcut_dir)
    assert len(ds) == 50
    native = {(321, 481), (480, 640)}
    canvas = (600, 640)
    seen, shapes = set(), set()
    for i in range(len(ds)):
        gt = ds[i]["gt"]
        obj, ign = gt == 1, gt == -1
        pad = [(0, 0), (0, 0)]
        if gt.shape not in native:
            pad = [(0, canvas[0] - gt.shape[0]), (0, canvas[1] - gt.shape[1])]
        shapes.add(np.pad(obj, pad).shape)
        for name, pred in _predictions(obj, i):
            clicked = np.zeros_like(obj)
            # Two clicks: the second one skips the first (same prediction), like the loop does.
            for _ in range(2 if name in ("shifted", "dilated") else 1):
                host = next_click(obj, pred, clicked, ign)
                y, x, pos = next_click_jit(
                    np.pad(obj, pad), np.pad(pred, pad), np.pad(clicked, pad), np.pad(~ign, pad)
                )
                assert (int(y), int(x), bool(pos)) == host, (ds.ids[i], name)
                clicked[host[0], host[1]] = True
                seen.add((name, host[2]))
    assert shapes == native | {canvas}
    # Both signs occurred (empty -> positive, full -> negative).
    assert {("empty", True), ("full", False)} <= seen


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1)])
def test_degenerate_shapes(shape):
    for gt, pred in itertools.product([np.zeros(shape, bool), np.ones(shape, bool)], repeat=2):
        _both(gt, pred)


_SHARDED_CLICKER = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from scipy import ndimage
    from samref_jax.interaction.clicker import next_click, next_click_jax

    from samref_jax.training.hlo import loop_collectives

    def walk(hlo):
        r = loop_collectives(hlo)
        return r.loops, r.inside, r.inside + r.outside

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sh = NamedSharding(mesh, P("data"))

    # The checker sees a collective in a loop whose condition reduces over the sharded batch
    # (what a vmapped data-dependent while_loop turns into).
    def reduce_loop(x):
        return jax.lax.while_loop(lambda c: c[0] < c[1].max(), lambda c: (c[0] + 1, c[1]),
                                  (jnp.int32(0), x))[0]
    probe = jax.jit(jax.vmap(reduce_loop), in_shardings=sh).lower(jnp.arange(8)).compile()
    n, inside, _ = walk(probe.as_text())
    assert n >= 1 and inside, probe.as_text()

    # 160 x 160: the row pass is a loop of at most three steps of 32 offsets (k_max = 79).
    b, h, w = 8, 160, 160
    rng = np.random.default_rng(0)
    gt = np.stack([ndimage.uniform_filter(rng.random((h, w)), 15) > 0.5 for _ in range(b)])
    pred = np.stack([np.roll(g, (i, -2 * i), axis=(0, 1)) for i, g in enumerate(gt)])
    pred[0] = False
    clicked = rng.random((b, h, w)) < 0.01
    valid = rng.random((b, h, w)) < 0.97
    # Vmapped over the sharded batch as is, the row pass's stopping test (a maximum over every
    # example) reduces across devices in the loop; run per device, as the training step does
    # (jax.shard_map), there is no collective at all.
    plain = jax.jit(jax.vmap(next_click_jax), in_shardings=sh, out_shardings=sh)
    n, inside, _ = walk(plain.lower(gt, pred, clicked, valid).compile().as_text())
    assert n >= 1 and inside, "expected the vmapped loop's condition to reduce across devices"
    per_device = jax.shard_map(
        jax.vmap(next_click_jax), mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )
    compiled = jax.jit(per_device).lower(gt, pred, clicked, valid).compile()
    n, inside, everywhere = walk(compiled.as_text())
    assert n >= 1, "expected the row pass's loop"
    assert not inside, inside
    assert not everywhere, everywhere
    ys, xs, pos = compiled(*(jax.device_put(a, sh) for a in (gt, pred, clicked, valid)))
    assert len(ys.sharding.device_set) == 4
    got = [(int(y), int(x), bool(p)) for y, x, p in zip(ys, xs, pos)]
    want = [next_click(*a) for a in zip(gt, pred, clicked, ~valid)]
    assert got == want, (got, want)
    print("OK", n)
    """
)


@pytest.mark.slow
def test_sharded_clicker_has_no_collectives():
    """4 fake CPU devices, batch sharded over ('data',): the vmapped clicker run per device
    (``jax.shard_map``, as in the training step) holds no collective at all, while the plain
    vmapped one all-reduces its loop condition across devices every iteration; the per-device
    one gives the host clicks."""
    run_script(_SHARDED_CLICKER, timeout=600)
