"""The refiners' GroupNorm as a function with a hand-written backward pass.

Same formula as ``nn.GroupNorm`` with its default fast variance (``E[x^2] - E[x]^2``), statistics
in float32, output in the compute ``dtype``. Each pass is two sweeps over the maps: one
reduction with several outputs (per-channel sums over H and W, grouped afterwards: XLA:CPU runs
this much faster than a reduction over a (B, H, W, G, C/G) view), then one elementwise loop. The
backward pass recomputes the statistics in the same reduction as the two sums it needs, of
``dy`` and ``dy * x``; from them come the parameter gradients and the input gradient
``dx = dy * P + x * Q + R`` with per-(image, channel) coefficients. Forward + backward at
512 x 512 x 32 in bfloat16 on a 2-core CPU: 29 ms, against 39 ms for autodiff of the same
forward pass.

>>> x = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4)
>>> y = group_norm(x, jnp.ones((4,)), jnp.zeros((4,)), 2, 1e-5, jnp.float32)
>>> y.shape, bool(abs(y[0, ..., :2].mean()) < 1e-5)
((2, 4, 4, 4), True)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32


def _channel_sums(terms: list[Array]) -> tuple[Array, ...]:
    """Per-(image, channel) sums over H and W of each (B, H, W, C) float32 term, as ONE
    reduction with len(terms) outputs, each (B, C)."""
    return jax.lax.reduce(
        tuple(terms),
        tuple(jnp.zeros((), F32) for _ in terms),
        lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)),
        (1, 2),
    )


def _group(s: Array, g: int) -> Array:
    """(B, C) per-channel values -> (B, G) sums over each group's channels."""
    b, c = s.shape
    return s.reshape(b, g, c // g).sum(-1)


def _per_channel(v: Array, c: int) -> Array:
    """(B, G) per-group values -> (B, C)."""
    return jnp.repeat(v, c // v.shape[1], axis=1)


def _stats(s1: Array, s2: Array, n: int, g: int, eps: float) -> tuple[Array, Array]:
    """(B, C) mean and inverse standard deviation of each channel's group, from (B, C) sums
    of x and x^2 over H, W (n: elements per group), float32."""
    c = s1.shape[1]
    mean = _group(s1, g) / n
    var = jnp.maximum(_group(s2, g) / n - mean * mean, 0.0)
    return _per_channel(mean, c), _per_channel(jax.lax.rsqrt(var + eps), c)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(
    x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float, dtype: Any
) -> Array:
    """GroupNorm of (B, H, W, C) x with (C,) float32 scale and bias: (B, H, W, C) in ``dtype``.

    ``num_groups`` must divide C; statistics per image and group over H, W and the group's
    channels, in float32.
    """
    return _forward(x, scale, bias, num_groups, epsilon, dtype)


def _forward(x, scale, bias, g, eps, dtype):
    _, h, w, c = x.shape
    if c % g:
        raise ValueError(f"{c} channels do not split into {g} groups")
    xf = x.astype(F32)
    mean, inv = _stats(*_channel_sums([xf, xf * xf]), h * w * (c // g), g, eps)
    mul = (inv * scale)[:, None, None, :]
    return ((xf - mean[:, None, None, :]) * mul + bias).astype(dtype)


def _fwd(x, scale, bias, g, eps, dtype):
    return _forward(x, scale, bias, g, eps, dtype), (x, scale)


def _bwd(g, eps, dtype, res, dy):
    x, scale = res
    _, h, w, c = x.shape
    n = h * w * (c // g)
    xf, gf = x.astype(F32), dy.astype(F32)
    # One sweep: the statistics (recomputed, not stored) and the two sums the gradients need.
    s_x, s_xx, s_dy, s_dyx = _channel_sums([xf, xf * xf, gf, gf * xf])  # (B, C) each
    mean, inv = _stats(s_x, s_xx, n, g, eps)
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
