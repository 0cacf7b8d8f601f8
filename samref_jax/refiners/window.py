"""PatchDiff window selection, RoI crop and paste-back (docs/design.md, 'PatchDiff window').

All functions work on ONE sample with static shapes and are jittable / vmappable; ``crop_patches``
and ``paste_patches`` are the batched versions.

Coordinates: a window is ``(x0, y0, x1, y1)`` float32 in *pixel-edge* units of the frame (pixel
column ``j`` spans ``[j, j + 1)``; ``x1``, ``y1`` exclusive). Clicks are in pixel-centre units
(pixel ``j`` has centre ``j``; see ``clicks.py``). A pixel is *inside* a window when its centre
``(j + 0.5, i + 0.5)`` (edge units) satisfies ``x0 <= j + 0.5 < x1`` and ``y0 <= i + 0.5 < y1``.

Sampling is RoIAlign-like with ``aligned=True``: output cell ``u`` of a ``P``-wide crop samples
the frame at edge coordinate ``x0 + (u + 0.5) * (x1 - x0) / P``, i.e. at pixel-index coordinate
``x0 + (u + 0.5) * w / P - 0.5``; bilinear interpolation between the four nearest pixel centres,
border pixels replicated outside the map.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array


def default_window_config() -> ml_collections.ConfigDict:
    """Window-selection / patch config (merged into the PatchDiff config)."""
    return ml_collections.ConfigDict(
        dict(
            patch_size=256,  # P, side of the refined patch
            expand=1.4,  # window = box of the changed pixels expanded about its centre
            object_frac=0.4,  # neighbourhood side L = max(min_side, frac * max(obj h, w))
            min_side=64.0,  # frame pixels (for a 1024 frame); also the minimum window side
            square=True,  # make the window square (side = max(w, h)) so the patch is isotropic
            image_sampling_ratio=2,  # RoIAlign sub-samples per patch cell and axis (image crop)
            logit_sampling_ratio=1,  # same, for the logits crop
            embed_patch_size=32,  # side of the embedding crop (resized to the stem by the net)
            paste_mode="residual",  # "residual": F = G + up(patch_G - patch_S) in the window;
            # "replace": F = up(patch_G) in the window. Outside the window F = G in both.
        )
    )


def _bbox(mask: Array) -> tuple[Array, Array]:
    """Bounding box of a (H, W) bool mask in edge units: ((4,) float32 x0,y0,x1,y1, empty)."""
    h, w = mask.shape
    cols = jnp.any(mask, axis=0)
    rows = jnp.any(mask, axis=1)
    return _bbox_from_any(rows, cols, h, w)


def _bbox_from_any(rows: Array, cols: Array, h: int, w: int) -> tuple[Array, Array]:
    x0 = jnp.argmax(cols)
    x1 = w - jnp.argmax(cols[::-1])
    y0 = jnp.argmax(rows)
    y1 = h - jnp.argmax(rows[::-1])
    box = jnp.stack([x0, y0, x1, y1]).astype(jnp.float32)
    return box, ~jnp.any(cols)


def select_window(
    prev_mask: Array, new_mask: Array, last_click_xy: Array, valid_hw: Array, cfg: Any
) -> Array:
    """Dynamic PatchDiff window for one sample.

    Rule: Diff = prev XOR new. Object box = bbox(new) (else bbox(prev), else none). Neighbourhood
    = square of side ``L = max(min_side, object_frac * max(box h, w))`` centred on the last click.
    Box = bbox(Diff inside the neighbourhood), or the neighbourhood itself if that is empty; the
    clicked pixel is always added. Then optionally made square, expanded ``expand`` x about its
    centre with side >= ``min_side``, and shifted (then clipped, only if larger) into the valid
    area ``[0, valid_w) x [0, valid_h)``. The result always contains the clicked pixel.

    Args:
      prev_mask: (H, W) bool, previous final mask (F_prev > 0); all False for the first click.
      new_mask: (H, W) bool, the new GlobalDiff mask (G > 0).
      last_click_xy: (2,) float, last click (x, y) in pixel-centre frame units.
      valid_hw: (2,) int, (height, width) of the unpadded image, anchored top-left in the frame.
      cfg: object with ``expand, object_frac, min_side, square`` (see default_window_config).

    Returns:
      (4,) float32 window (x0, y0, x1, y1) in frame pixel-edge units, x1/y1 exclusive.
    """
    h, w = new_mask.shape
    prev_mask = prev_mask.astype(bool)
    new_mask = new_mask.astype(bool)
    vh = jnp.asarray(valid_hw[0], jnp.float32)
    vw = jnp.asarray(valid_hw[1], jnp.float32)
    min_side = jnp.float32(cfg.min_side)

    # The clicked pixel (clamped into the valid area) and its centre in edge units.
    click = jnp.asarray(last_click_xy, jnp.float32)
    px = jnp.clip(jnp.floor(click[0] + 0.5), 0.0, vw - 1.0)
    py = jnp.clip(jnp.floor(click[1] + 0.5), 0.0, vh - 1.0)
    cx, cy = px + 0.5, py + 0.5

    # Neighbourhood side from the object box.
    new_box, new_empty = _bbox(new_mask)
    prev_box, prev_empty = _bbox(prev_mask)
    obj = jnp.where(new_empty, prev_box, new_box)
    obj_side = jnp.maximum(obj[2] - obj[0], obj[3] - obj[1])
    obj_side = jnp.where(new_empty & prev_empty, 0.0, obj_side)
    side = jnp.maximum(min_side, cfg.object_frac * obj_side)
    half = 0.5 * side

    # Bounding box of Diff inside the neighbourhood.
    diff = prev_mask ^ new_mask
    col_in = jnp.abs(jnp.arange(w, dtype=jnp.float32) + 0.5 - cx) <= half
    row_in = jnp.abs(jnp.arange(h, dtype=jnp.float32) + 0.5 - cy) <= half
    cols = jnp.any(diff & row_in[:, None], axis=0) & col_in
    rows = jnp.any(diff & col_in[None, :], axis=1) & row_in
    diff_box, diff_empty = _bbox_from_any(rows, cols, h, w)
    hood = jnp.stack([cx - half, cy - half, cx + half, cy + half])
    box = jnp.where(diff_empty, hood, diff_box)
    # Always include the clicked pixel.
    box = jnp.stack(
        [
            jnp.minimum(box[0], px),
            jnp.minimum(box[1], py),
            jnp.maximum(box[2], px + 1.0),
            jnp.maximum(box[3], py + 1.0),
        ]
    )

    # Expand about the centre, honour min side, fit into the valid area.
    ctr_x, ctr_y = 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])
    bw, bh = box[2] - box[0], box[3] - box[1]
    if cfg.square:
        bw = bh = jnp.maximum(bw, bh)
    bw = jnp.minimum(jnp.maximum(cfg.expand * bw, min_side), vw)
    bh = jnp.minimum(jnp.maximum(cfg.expand * bh, min_side), vh)
    x0 = jnp.clip(ctr_x - 0.5 * bw, 0.0, vw - bw)
    y0 = jnp.clip(ctr_y - 0.5 * bh, 0.0, vh - bh)
    return jnp.stack([x0, y0, x0 + bw, y0 + bh]).astype(jnp.float32)


def _lerp_weights(pos: Array, n: int) -> tuple[Array, Array, Array]:
    """Neighbour indices ``i0``, ``i1`` and weight ``t`` of float pixel-index positions in an
    ``n``-long axis (positions clamped into the axis)."""
    p = jnp.clip(pos, 0.0, n - 1.0)
    i0 = jnp.clip(jnp.floor(p).astype(jnp.int32), 0, max(n - 2, 0))
    i1 = jnp.minimum(i0 + 1, n - 1)
    return i0, i1, (p - i0.astype(p.dtype)).astype(jnp.float32)


def _lerp_axis(x: Array, pos: Array, axis: int) -> Array:
    """Linear interpolation of ``x`` along ``axis`` at float pixel-index positions ``pos``."""
    i0, i1, t = _lerp_weights(pos, x.shape[axis])
    shape = [1] * x.ndim
    shape[axis] = pos.shape[0]
    t = t.reshape(shape)
    # "clip": the indices are in range already, and the default mode's out-of-range fill
    # would add a select per element.
    a = jnp.take(x, i0, axis=axis, mode="clip").astype(jnp.float32)
    b = jnp.take(x, i1, axis=axis, mode="clip").astype(jnp.float32)
    return a + (b - a) * t


def _lerp_matrix(pos: Array, n: int) -> Array:
    """(len(pos), n) matrix of :func:`_lerp_axis`'s weights: row k has ``1 - t`` at ``i0`` and
    ``t`` at ``i1`` (a sum of 1 at ``i0`` when ``t == 0``), so ``M @ x`` interpolates ``x``."""
    i0, i1, t = _lerp_weights(pos, n)
    k, t = jnp.arange(n, dtype=jnp.int32)[None, :], t[:, None]
    return jnp.where(k == i0[:, None], 1.0 - t, 0.0) + jnp.where(k == i1[:, None], t, 0.0)


def crop_patch(
    x: Array,
    window: Array,
    out_size: int,
    stride: float | tuple[float, float] = 1.0,
    sampling_ratio: int = 1,
) -> Array:
    """RoIAlign-style bilinear crop of one map over a window.

    Args:
      x: (H, W) or (H, W, C) map whose pixel ``j`` covers frame edge units
        ``[j * stride, (j + 1) * stride)`` (stride 1 for frame-resolution maps, 16 for SAM's
        64x64 embedding of a 1024 frame).
      window: (4,) (x0, y0, x1, y1) in frame pixel-edge units.
      out_size: static side P of the (square) output.
      stride: static frame pixels per map pixel, a float or (stride_y, stride_x).
      sampling_ratio: static; sub-samples per output cell and axis, averaged (anti-aliasing when
        the window is larger than P).

    Returns:
      (P, P) or (P, P, C) float32.
    """
    window = jnp.asarray(window, jnp.float32)
    sy, sx = (stride, stride) if isinstance(stride, int | float) else stride
    s = int(sampling_ratio)
    n = out_size * s
    grid = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n

    def pos(lo, hi, st):
        return (lo + grid * (hi - lo)) / st - 0.5

    def one_axis(a: Array, lo: Array, hi: Array, st: float) -> Array:
        # Along axis 0, where a gather moves whole contiguous rows (fast on every backend);
        # the sub-sample mean is separable, so each axis is averaged right after its lerp. The
        # mean is a sum of the s sub-sample interpolations (one fused elementwise loop; as a
        # reshaped mean, XLA:CPU's reduction over the size-s axis took 5 of the image crop's
        # 10 ms per 1024 frame).
        p = pos(lo, hi, st).reshape(out_size, s)
        acc = _lerp_axis(a, p[:, 0], 0)
        for k in range(1, s):
            acc = acc + _lerp_axis(a, p[:, k], 0)
        return acc / s if s > 1 else acc

    y = one_axis(x, window[1], window[3], sy)  # (P, W[, C])
    y = one_axis(jnp.swapaxes(y, 0, 1), window[0], window[2], sx)  # (P_x, P_y[, C])
    return jnp.swapaxes(y, 0, 1)


def inside_window(window: Array, height: int, width: int) -> Array:
    """(H, W) bool: pixels whose centre lies inside the window (see module docstring)."""
    xs = jnp.arange(width, dtype=jnp.float32) + 0.5
    ys = jnp.arange(height, dtype=jnp.float32) + 0.5
    col = (xs >= window[0]) & (xs < window[2])
    row = (ys >= window[1]) & (ys < window[3])
    return row[:, None] & col[None, :]


def paste_patch(full: Array, patch: Array, window: Array, add: bool = False) -> Array:
    """Paste a (P, P[, C]) patch back into a (H, W[, C]) frame map over a window.

    Pixels whose centre is inside the window get the bilinearly sampled patch value (the inverse
    mapping of :func:`crop_patch`), or ``full + sampled`` when ``add``; every other pixel is
    bit-identical to ``full``.

    Returns:
      Array with the shape and dtype of ``full``.
    """
    window = jnp.asarray(window, jnp.float32)
    h, w = full.shape[:2]
    ph, pw = patch.shape[:2]
    bw = jnp.maximum(window[2] - window[0], 1e-6)
    bh = jnp.maximum(window[3] - window[1], 1e-6)
    v = (jnp.arange(h, dtype=jnp.float32) + 0.5 - window[1]) * (ph / bh) - 0.5
    u = (jnp.arange(w, dtype=jnp.float32) + 0.5 - window[0]) * (pw / bw) - 0.5
    # Columns first, as a product with the (W, P) interpolation matrix: a dot's output is
    # materialised, whereas a gather fused into the frame-sized loop below made XLA recompute
    # the patch's producers (refiner heads, crops) for every frame pixel (17 ms instead of
    # about 3 ms per 1024 frame on CPU). The rows' gather then moves contiguous rows.
    cols = jnp.einsum(
        "ju,pu...->pj...",
        _lerp_matrix(u, pw),
        patch.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    vals = _lerp_axis(cols, v, 0)
    if add:
        vals = full.astype(jnp.float32) + vals
    mask = inside_window(window, h, w).reshape((h, w) + (1,) * (full.ndim - 2))
    return jnp.where(mask, vals.astype(full.dtype), full)


def crop_patches(
    x: Array,
    windows: Array,
    out_size: int,
    stride: float | tuple[float, float] = 1.0,
    sampling_ratio: int = 1,
) -> Array:
    """Batched :func:`crop_patch`: x (B, H, W[, C]), windows (B, 4) -> (B, P, P[, C]).

    Use it for the patch-space ground truth of a loss, e.g.
    ``crop_patches(gt.astype(jnp.float32), out.window, P) > 0.5``.
    """
    fn = lambda a, win: crop_patch(a, win, out_size, stride, sampling_ratio)
    return jax.vmap(fn)(x, windows)


def paste_patches(full: Array, patch: Array, windows: Array, add: bool = False) -> Array:
    """Batched :func:`paste_patch`: full (B, H, W[, C]), patch (B, P, P[, C]), windows (B, 4)."""
    return jax.vmap(lambda f, p, win: paste_patch(f, p, win, add))(full, patch, windows)


def clicks_to_patch(coords: Array, window: Array, patch_size: int) -> Array:
    """Map (..., 2) pixel-centre frame clicks into pixel-centre patch coordinates.

    ``u = (x + 0.5 - x0) * P / (x1 - x0) - 0.5`` (and likewise for y). ``window`` is (4,) (or
    broadcastable, e.g. (B, 1, 4) for (B, N, 2) clicks).
    """
    window = jnp.asarray(window, jnp.float32)
    lo = window[..., 0:2]
    size = jnp.maximum(window[..., 2:4] - lo, 1e-6)
    return (jnp.asarray(coords, jnp.float32) + 0.5 - lo) * (patch_size / size) - 0.5


def patch_radius(radius: Array, window: Array, patch_size: int) -> Array:
    """Disk radius in patch pixels: ``radius * P / side``; side = sqrt(w * h) of the window
    (= its side for the default square windows). radius (...,), window (..., 4)."""
    window = jnp.asarray(window, jnp.float32)
    side = jnp.sqrt(
        jnp.maximum((window[..., 2] - window[..., 0]) * (window[..., 3] - window[..., 1]), 1e-12)
    )
    return jnp.asarray(radius, jnp.float32) * (patch_size / side)
