"""Click encodings for the early-fusion refiners: binary disk maps.

Coordinate convention (shared by the whole ``refiners`` package):

* Clicks are ``(x, y)`` in *pixel-centre* units of a frame: the pixel in column ``j`` and row
  ``i`` has its centre at ``(j, i)``. This is how SAM receives points (integer pixel indices,
  SAM adds 0.5 itself before its positional encoding).
* Windows (see ``window.py``) are given in *pixel-edge* units: pixel ``j`` spans ``[j, j + 1)``,
  so a click at centre coordinate ``x`` sits at edge coordinate ``x + 0.5``.

Labels: ``1`` positive, ``0`` negative, ``-1`` padding (ignored). ``2`` / ``3`` are the corners of
a box prompt (SAM's box encoding, ``ClickState.add_box``): no disk is drawn for them, so the
refiners see a box only through SAM's mask (and the window it puts PatchDiff's crop in).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def disk_maps(
    coords: Array, labels: Array, height: int, width: int, radius: Array | float
) -> Array:
    """Positive and negative click disks for one sample.

    Args:
      coords: (N, 2) float, click ``(x, y)`` in pixel-centre units of the output frame.
      labels: (N,) int, 1 positive, 0 negative, -1 padding (ignored).
      height, width: static output size in pixels.
      radius: scalar (may be traced), disk radius in output-frame pixels. A pixel belongs to
        a disk when the distance between its centre and the click is ``<= radius``.

    Returns:
      (height, width, 2) float32; channel 0 = union of positive disks, 1 = negative disks.
    """
    coords = jnp.asarray(coords, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    r2 = jnp.square(jnp.asarray(radius, jnp.float32))
    ys = jnp.arange(height, dtype=jnp.float32)[:, None, None]
    xs = jnp.arange(width, dtype=jnp.float32)[None, :, None]
    d2 = jnp.square(xs - coords[:, 0]) + jnp.square(ys - coords[:, 1])  # (H, W, N)
    inside = d2 <= r2
    pos = jnp.any(inside & (labels == 1), axis=-1)
    neg = jnp.any(inside & (labels == 0), axis=-1)
    return jnp.stack([pos, neg], axis=-1).astype(jnp.float32)


def batch_disk_maps(
    coords: Array, labels: Array, height: int, width: int, radius: Array | float
) -> Array:
    """Batched :func:`disk_maps`.

    Args:
      coords: (B, N, 2) float pixel-centre ``(x, y)``; labels: (B, N) int;
      radius: scalar or (B,) radius in output-frame pixels.

    Returns:
      (B, height, width, 2) float32.
    """
    radius = jnp.broadcast_to(jnp.asarray(radius, jnp.float32), coords.shape[:1])
    fn = lambda c, lab, r: disk_maps(c, lab, height, width, r)
    return jax.vmap(fn)(coords, labels, radius)


def scale_clicks(
    coords: Array,
    from_hw: tuple[float, float] | Array,
    to_hw: tuple[float, float] | Array,
    half_pixel: bool = True,
) -> Array:
    """Rescale click coordinates from one frame size to another.

    Args:
      coords: (..., 2) ``(x, y)`` pixel-centre coordinates in a frame of size ``from_hw``.
      from_hw, to_hw: (height, width) of the source and target frames.
      half_pixel: if True (default) pixel centres map to pixel centres,
        ``x' = (x + 0.5) * s - 0.5`` (consistent with bilinear resizing); if False the plain
        ``x' = x * s`` that SAM's ``ResizeLongestSide.apply_coords`` uses.

    Returns:
      (..., 2) float32 coordinates in the target frame.
    """
    from_hw = jnp.asarray(from_hw, jnp.float32)
    to_hw = jnp.asarray(to_hw, jnp.float32)
    scale = (to_hw / from_hw)[::-1]  # (sx, sy)
    coords = jnp.asarray(coords, jnp.float32)
    if half_pixel:
        return (coords + 0.5) * scale - 0.5
    return coords * scale


def work_hw(cfg: Any, hw: tuple[int, int]) -> tuple[int, int]:
    """A refiner's working (height, width): ``cfg.input_size`` square, or the frame ``hw``."""
    return hw if cfg.input_size is None else (int(cfg.input_size), int(cfg.input_size))


def draw_disks(
    coords: Array, labels: Array, radius: Array, frame_hw: tuple[int, int], work_hw: tuple[int, int]
) -> Array:
    """Disks of (B, N, 2) frame clicks with (B,) frame radii, drawn at the working size."""
    if work_hw != frame_hw:
        coords = scale_clicks(coords, frame_hw, work_hw)
        scale = ((work_hw[0] / frame_hw[0]) * (work_hw[1] / frame_hw[1])) ** 0.5
        radius = radius * scale
    return batch_disk_maps(coords, labels, work_hw[0], work_hw[1], radius)
