"""The refiners' GroupNorm, alone and followed by its activation, as functions with
hand-written backward passes.

Same formula as ``nn.GroupNorm`` with its default fast variance (``E[x^2] - E[x]^2``), statistics
in float32, output in the compute ``dtype``. Statistics are per-channel float32 sums over H
and W, grouped afterwards (XLA:CPU runs this much faster than a reduction over a
(B, H, W, G, C/G) view). The backward pass keeps the (B, C) mean and inverse deviation from the
forward pass and needs two more per-channel sums, of ``dy`` and ``dy * x``; from them come the
parameter gradients and the input gradient ``dx = dy * P + x * Q + R`` with per-(image, channel)
coefficients: one elementwise loop. Plain sums, which XLA fuses with the ops that produce their
operands: one multi-output ``lax.reduce`` (as ``conv.py`` uses for its products of taps) made
the vit_b recipe's rounds slower here. Measured on a 2-core CPU, ``value_and_grad`` of T = 2 click
rounds of the vit_b recipe: 3.33 s, against 3.52 s with autodiff of the same forward pass
(medians of 5). :func:`group_norm_act` adds the block's residual input and activation in the
same float32 loop (a bf16 chain rounds after each operation, which XLA:CPU emulates with two
conversions apiece).

>>> x = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4)
>>> y = group_norm(x, jnp.ones((4,)), jnp.zeros((4,)), 2, 1e-5, jnp.float32)
>>> y.shape, bool(abs(y[0, ..., :2].mean()) < 1e-5)
((2, 4, 4, 4), True)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
F32 = jnp.float32


def _group(s: Array, g: int) -> Array:
    """(B, C) per-channel values -> (B, G) sums over each group's channels."""
    b, c = s.shape
    return s.reshape(b, g, c // g).sum(-1)


def _per_channel(v: Array, c: int) -> Array:
    """(B, G) per-group values -> (B, C), each group's value on its C / G channels.

    A gather with constant indices, which XLA computes on its own: ``jnp.repeat`` (a broadcast
    to (B, G, C / G) viewed as (B, C)) is fused into the full-size loops that use the
    statistics, and that view kept XLA:CPU from vectorising them: the backward pass of
    GroupNorm + GELU fused with the next depthwise layer's took 62 ms at 512 x 512 x 32 in
    bf16 on a 2-core CPU, 21 ms with the gather.
    """
    g = v.shape[1]
    return jnp.take(v, np.repeat(np.arange(g), c // g), axis=1)


def _pixel_sum(t: Array) -> Array:
    """(B, H, W, C) float32 -> (B, C) sums over H and W."""
    return jnp.sum(t, axis=(1, 2))


def _stats(xf: Array, g: int, eps: float) -> tuple[Array, Array]:
    """(B, C) mean and inverse standard deviation of each channel's group of float32 x."""
    _, h, w, c = xf.shape
    n = h * w * (c // g)
    mean = _group(_pixel_sum(xf), g) / n
    var = jnp.maximum(_group(_pixel_sum(xf * xf), g) / n - mean * mean, 0.0)
    return _per_channel(mean, c), _per_channel(jax.lax.rsqrt(var + eps), c)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(
    x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float, dtype: Any
) -> Array:
    """GroupNorm of (B, H, W, C) x with (C,) float32 scale and bias: (B, H, W, C) in ``dtype``.

    ``num_groups`` must divide C; statistics per image and group over H, W and the group's
    channels, in float32.
    """
    return _fwd(x, scale, bias, num_groups, epsilon, dtype)[0]


def _checked_stats(x: Array, g: int, eps: float) -> tuple[Array, Array, Array]:
    """float32 x and its (B, C) group mean and inverse deviation; C must split into g groups."""
    c = x.shape[-1]
    if c % g:
        raise ValueError(f"{c} channels do not split into {g} groups")
    xf = x.astype(F32)
    return (xf, *_stats(xf, g, eps))


def _pre_act(xf, scale, bias, skip, mean, inv):
    """GroupNorm's float32 output (+ skip): the input of the activation, if any."""
    u = (xf - mean[:, None, None, :]) * (inv * scale)[:, None, None, :] + bias
    return u if skip is None else u + skip.astype(F32)


def _fwd(x, scale, bias, g, eps, dtype):
    xf, mean, inv = _checked_stats(x, g, eps)
    y = _pre_act(xf, scale, bias, None, mean, inv).astype(dtype)
    return y, (x, scale, mean, inv)


def _bwd(g, eps, dtype, res, dy):
    x, scale, mean, inv = res
    _, h, w, c = x.shape
    n = h * w * (c // g)
    xf, gf = x.astype(F32), dy.astype(F32)
    s_dy, s_dyx = _pixel_sum(gf), _pixel_sum(gf * xf)  # (B, C) each, float32
    centred = s_dyx - mean * s_dy  # sum over H, W of dy * (x - mean), per channel
    d_bias = s_dy.sum(0)
    d_scale = (inv * centred).sum(0)
    # dx = inv * (dy*scale - A - xhat * Bm), A and Bm the group means of dy*scale and
    # dy*scale*xhat, xhat = (x - mean) * inv.
    a = _per_channel(_group(scale * s_dy, g), c) / n
    bm = _per_channel(_group(scale * inv * centred, g), c) / n
    p = inv * scale
    q = -inv * inv * bm
    r = -inv * a + mean * inv * inv * bm
    dx = gf * p[:, None, None, :] + xf * q[:, None, None, :] + r[:, None, None, :]
    return dx.astype(x.dtype), d_scale, d_bias


group_norm.defvjp(_fwd, _bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def group_norm_act(
    x: Array,
    scale: Array,
    bias: Array,
    skip: Array | None,
    num_groups: int,
    epsilon: float,
    dtype: Any,
    act: Callable[[Array], Array],
) -> Array:
    """``act(group_norm(x) + skip)`` of (B, H, W, C) x in float32, rounded to ``dtype`` once.

    ``skip``: (B, H, W, C) residual input or None; ``act``: an elementwise activation
    (e.g. exact GELU). The same function as :func:`group_norm` followed by the addition and the
    activation, without rounding between them (in float32, the same operations in the same
    order). The backward pass keeps only x, skip and the (B, C) statistics, recomputes the
    pre-activation in float32 and applies :func:`group_norm`'s backward pass to its gradient
    (autodiff would also keep the activation's input, one more full-size array per layer).

    >>> x = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4)
    >>> y = group_norm_act(x, jnp.ones((4,)), jnp.zeros((4,)), None, 2, 1e-5, F32, jax.nn.relu)
    >>> y.shape, bool(y.min() == 0)
    ((2, 4, 4, 4), True)
    """
    return _norm_act_fwd(x, scale, bias, skip, num_groups, epsilon, dtype, act)[0]


def _norm_act_fwd(x, scale, bias, skip, g, eps, dtype, act):
    xf, mean, inv = _checked_stats(x, g, eps)
    y = act(_pre_act(xf, scale, bias, skip, mean, inv)).astype(dtype)
    return y, (x, scale, bias, skip, mean, inv)


def _norm_act_bwd(g, eps, dtype, act, res, dz):
    x, scale, bias, skip, mean, inv = res
    _, act_vjp = jax.vjp(act, _pre_act(x.astype(F32), scale, bias, skip, mean, inv))
    (du,) = act_vjp(dz.astype(F32))
    dx, d_scale, d_bias = _bwd(g, eps, dtype, (x, scale, mean, inv), du)
    return dx, d_scale, d_bias, None if skip is None else du.astype(skip.dtype)


group_norm_act.defvjp(_norm_act_fwd, _norm_act_bwd)
