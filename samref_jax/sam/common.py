"""Layers shared by SAM's parts, written to match PyTorch numerics exactly.

Traps handled here (docs/design.md, 'SAM numerics'): GELU is exact (erf); LayerNorm uses the
two-pass variance (`use_fast_variance=False`) with the epsilon each part of SAM uses; torch's
bilinear `F.interpolate(..., align_corners=False)` never anti-aliases, unlike
`jax.image.resize`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU with torch's formula, `x * 0.5 * (1 + erf(x / sqrt(2)))`.

    Same function as `jax.nn.gelu(x, approximate=False)` (which uses `erfc`), but XLA:CPU runs
    `erf` about 3x faster than `erfc`, and this is the expression `torch.nn.GELU()` evaluates.
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def layer_norm(eps: float, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis with torch numerics (two-pass variance, fp32 params)."""
    return nn.LayerNorm(
        epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, name=name
    )


class KernelAndBias(nn.Module):
    """The parameters of one ``nn.Dense`` or ``nn.Conv`` layer, returned instead of applied.

    Same names (``kernel`` of ``shape``, ``bias`` of ``shape[-1:]``) and initialisers as the layer
    it stands for, so checkpoints do not change, while the caller is free to multiply them in a
    cheaper order or to run several layers as one. ``() -> (kernel, bias)``, float32.

    >>> k, b = KernelAndBias((3, 4)).apply(KernelAndBias((3, 4)).init(jax.random.key(0)))
    >>> k.shape, b.shape
    ((3, 4), (4,))
    """

    shape: tuple[int, ...]
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", self.kernel_init, self.shape, jnp.float32)
        return kernel, self.param("bias", self.bias_init, self.shape[-1:], jnp.float32)


class MLPBlock(nn.Module):
    """Two linear layers with an activation in between: `lin2(act(lin1(x)))`.

    x: (..., D) -> (..., D). `act` is "gelu" (image encoder) or "relu" (two-way transformer).
    """

    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="lin1")(x)
        x = gelu(x) if self.act == "gelu" else jax.nn.relu(x)
        return nn.Dense(dim, dtype=self.dtype, name="lin2")(x)


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (the decoder's hypernetwork/IoU MLPs).

    x: (..., in) -> (..., output_dim).
    """

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(
                self.output_dim if last else self.hidden_dim, dtype=self.dtype, name=f"layers_{i}"
            )(x)
            if not last:
                x = jax.nn.relu(x)
        return x


class ConvTranspose2x2(nn.Module):
    """`torch.nn.ConvTranspose2d(in, out, kernel_size=2, stride=2)` in NHWC.

    With kernel 2 and stride 2 the output blocks do not overlap:
    `out[2i+a, 2j+b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o]`. The kernel is the
    torch weight (in, out, kh, kw) transposed to (kh, kw, in, out); no spatial flip is needed in
    this form. x: (B, H, W, C) -> (B, 2H, 2W, features).

    One matrix product per output row parity ``a``: its (B, H, W, 2 * features) result already
    is output row ``2i + a`` in memory, so no transpose of the (B, 2H, 2W, features) output is
    needed (a single einsum to "nhawbo" made XLA:CPU transpose it: 8 vs 5 ms at SAM's sizes).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        rows = [
            jnp.einsum("nhwc,bco->nhwbo", x, kernel[a]).reshape(n, h, 2 * w, self.features)
            for a in range(2)
        ]
        y = jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, self.features)
        return y + bias.astype(self.dtype)


def _linear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch bilinear resampling (align_corners=False)."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of the weights :func:`resize_bilinear` uses along one
    axis: ``M @ v`` resizes a vector ``v`` like torch's bilinear ``interpolate``.

    >>> resize_matrix(2, 4) @ np.array([0.0, 1.0], np.float32)
    array([0.  , 0.25, 0.75, 1.  ], dtype=float32)
    """
    i0, i1, w1 = _linear_weights(in_size, out_size)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), np.float32(1) - w1)
    np.add.at(m, (rows, i1), w1)
    return m


def resize_bilinear(
    x: jax.Array, size: tuple[int, int], axes: tuple[int, int] = (-2, -1)
) -> jax.Array:
    """Bilinear resize like `torch.nn.functional.interpolate(align_corners=False)`.

    No anti-aliasing when downsampling (unlike `jax.image.resize`). `size` is the static
    (out_h, out_w); `axes` are the two spatial axes of `x` (default: the last two, i.e. an
    (..., H, W) map; use (1, 2) for NHWC).
    """
    out = x
    steps = list(zip(axes, size, strict=True))
    if size[-1] > x.shape[axes[-1]]:
        # Upsampling the inner axis: do it first, while the array is small (its gather moves
        # single elements; the outer axis' gather moves whole rows).
        steps = steps[::-1]
    for axis, n_out in steps:
        n_in = x.shape[axis]
        if n_in == n_out:
            continue
        i0, i1, w1 = _linear_weights(n_in, n_out)
        shape = [1] * out.ndim
        shape[axis] = n_out
        w = jnp.asarray(w1).reshape(shape).astype(out.dtype)
        a = jnp.take(out, jnp.asarray(i0), axis=axis)
        b = jnp.take(out, jnp.asarray(i1), axis=axis)
        out = a * (1 - w) + b * w
    return out
