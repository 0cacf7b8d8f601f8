"""The refiners' convolutions as functions with hand-written backward passes.

Each takes float32 parameters and a compute ``dtype`` (e.g. bfloat16) and computes its forward
pass in ``dtype`` as the layer it stands for (``nn.Conv``: dense, grouped or 1 x 1). The
backward passes differ from what autodiff would trace, measured in
``benchmarks/train_step.py`` at the vit_b recipe's 512 x 512 x 32 GlobalDiff grid:

* parameter gradients are float32 sums of float32 products, the products fused into the sums
  (one reduction for all of a layer's taps where the operands allow): autodiff of a bf16 layer
  sums rounded products in bf16, and XLA:CPU splits each 8M-element sum into a slow windowed
  reduction, about 50 ms apiece;
* a dense kernel's gradient is one matrix product per tap (rows = pixels), or for a kernel with
  few outputs (the heads) part of one fused reduction, not a convolution with a 512 x 512
  window, which XLA:CPU may run outside its fast kernels (1.1 s per call measured for the stem
  inside the training step's loop);
* a strided convolution's input gradient is one matrix product for all taps and a strided
  placement of each tap's slice, not XLA's transposed convolution (0.18 s per click round for
  the stem);
* bf16 maps are padded as 16-bit integers (:func:`_pad_hw`), so their taps are read without
  being rounded again.

Other input gradients are what autodiff computes, in ``dtype``.

>>> x = jnp.ones((1, 8, 8, 4))
>>> depthwise_conv(x, jnp.ones((3, 3, 4)), jnp.zeros((4,)), jnp.float32)[0, 4, 4, 0]
Array(9., dtype=float32)
>>> conv2d(x, jnp.ones((3, 3, 4, 2)), jnp.zeros((2,)), 2, jnp.float32).shape
(1, 4, 4, 2)
>>> pointwise_conv(x, jnp.ones((4, 3)), jnp.zeros((3,)), jnp.float32)[0, 0, 0]
Array([4., 4., 4.], dtype=float32)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32
_FEW_OUTPUTS = 4  # conv2d's kernel gradient as fused sums up to this many output channels


def _taps(x: Array, k: int, stride: int, out_hw: tuple[int, int]) -> list[Array]:
    """The k*k (B, ho, wo, C) views of a padded (B, H', W', C) array a k x k kernel reads."""
    ho, wo = out_hw
    return [
        x[:, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride]
        for dy in range(k)
        for dx in range(k)
    ]


def _pixel_sums(terms: list[Array]) -> tuple[Array, ...]:
    """Sums over (B, H, W) of each (B, H, W, C) float32 term (one shape), as ONE reduction with
    len(terms) outputs: XLA fuses the terms' products into its loop (a separate sum per term
    materialises its float32 product first: 2.7x slower at 512 x 512 x 32 on a CPU)."""
    return jax.lax.reduce(
        tuple(terms),
        tuple(jnp.zeros((), F32) for _ in terms),
        lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)),
        (0, 1, 2),
    )


def _pad_hw(x: Array, lo: int, hi: int) -> Array:
    """Zero-pad H and W of (B, H, W, C) x; a 16-bit float array is padded as its bits.

    The same values as ``jnp.pad``. XLA:CPU has no bf16 pad: it pads a float32 copy, and the
    taps read from it were each rounded back to bf16 inside their loop (nine emulated roundings
    per element for a 3 x 3 kernel; docs/benchmarks.md, 'train_step.py'). An integer pad is
    plain data movement, and the bits it moves need no rounding.
    """
    pads = ((0, 0), (lo, hi), (lo, hi), (0, 0))
    if jnp.dtype(x.dtype).itemsize != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.pad(x, pads)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.pad(bits, pads), x.dtype)


def _same_pad(k: int) -> tuple[int, int]:
    return (k - 1) // 2, k - 1 - (k - 1) // 2


# ------------------------------------------------------------------------- depthwise


def _depthwise(
    x: Array, kernel: Array, bias: Array, dtype: Any, pad: tuple[int, int] | None = None
) -> Array:
    # Inputs and weights rounded to ``dtype`` as the layer sees them; the k*k products summed
    # in float32 inside the fused loop and rounded once, as a convolution accumulates. (A bf16
    # chain rounds after every multiply and add: XLA:CPU emulates each with two conversions,
    # 2.1x slower at 512 x 512 x 32, and twice the error against float32.)
    k = kernel.shape[0]
    lo, hi = _same_pad(k) if pad is None else pad
    h, w = x.shape[1:3]
    xp = _pad_hw(x.astype(dtype), lo, hi)
    kern = kernel.astype(dtype).astype(F32)
    out = jnp.zeros(x.shape, F32) + bias.astype(dtype).astype(F32)
    for t, view in enumerate(_taps(xp, k, 1, (h, w))):
        out = out + view.astype(F32) * kern[t // k, t % k]
    return out.astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def depthwise_conv(x: Array, kernel: Array, bias: Array, dtype: Any) -> Array:
    """Depthwise k x k convolution, stride 1, SAME padding: (B, H, W, C) -> (B, H, W, C) dtype.

    kernel (k, k, C) and bias (C,) float32 (``nn.Conv(C, (k, k), feature_group_count=C)``'s
    kernel is (k, k, 1, C)). The forward pass is k*k shifted multiply-adds of ``dtype`` inputs,
    accumulated in float32 and rounded to ``dtype`` once (one fused elementwise loop); the
    backward pass the same for the input gradient, and float32 sums for the parameters'.
    """
    return _depthwise(x, kernel, bias, dtype)


def _depthwise_fwd(x, kernel, bias, dtype):
    return _depthwise(x, kernel, bias, dtype), (x, kernel)


def _depthwise_bwd(dtype, res, g):
    x, kernel = res
    k = kernel.shape[0]
    lo, hi = _same_pad(k)
    h, w = x.shape[1:3]
    # dx[z] = sum_d g[z - d + lo] kernel[d]: the forward loop on g, kernel flipped, padding
    # swapped, no bias.
    dx = _depthwise(g, kernel[::-1, ::-1], jnp.zeros(kernel.shape[-1:], F32), dtype, (hi, lo))
    xp = _pad_hw(x, lo, hi)
    gf = g.astype(F32)
    sums = _pixel_sums([gf * v.astype(F32) for v in _taps(xp, k, 1, (h, w))] + [gf])
    return dx.astype(x.dtype), jnp.stack(sums[:-1]).reshape(kernel.shape), sums[-1]


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


# ----------------------------------------------------------------------------- dense


def _conv(x: Array, kernel: Array, stride: int, pad: tuple[int, int], dtype: Any) -> Array:
    lo, hi = pad
    return jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        (stride, stride),
        ((lo, hi), (lo, hi)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _conv2d(x, kernel, bias, stride, pad, dtype, out_dtype):
    out_dtype = dtype if out_dtype is None else out_dtype
    return _conv(x, kernel, stride, pad, dtype).astype(out_dtype) + bias.astype(out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def conv2d(
    x: Array,
    kernel: Array,
    bias: Array,
    stride: int,
    dtype: Any,
    out_dtype: Any = None,
    pad: tuple[int, int] | None = None,
) -> Array:
    """k x k convolution: (B, H, W, Cin) -> (B, Ho, Wo, Cout), Ho = (H + lo + hi - k) // stride + 1.

    kernel (k, k, Cin, Cout), bias (Cout,) float32. ``pad`` = (lo, hi) zeros before and after
    on both spatial axes (default ``"SAME"``'s ((k-1)//2, k//2)). The convolution runs in
    ``dtype``, the bias is added in ``out_dtype`` (default ``dtype``, as
    ``nn.Conv(dtype=dtype)`` does).
    """
    return _conv2d(x, kernel, bias, stride, _pad_of(kernel, pad), dtype, out_dtype)


def _pad_of(kernel: Array, pad: tuple[int, int] | None) -> tuple[int, int]:
    return _same_pad(kernel.shape[0]) if pad is None else (int(pad[0]), int(pad[1]))


def _strided_input_grad(
    g: Array, kernel: Array, stride: int, pad: tuple[int, int], x_shape: tuple[int, ...]
) -> Array:
    """Input gradient of a strided convolution: one matrix product g @ kernel^T for all taps,
    each tap's (B, ho, wo, Cin) slice put back on its strided grid (interior padding), summed
    and cropped. (XLA's transposed convolution at stride 2 took 0.18 s per click round for the
    recipe's 1024 x 1024 x 7 stem input on a CPU.)"""
    k, cin = kernel.shape[0], kernel.shape[2]
    lo, hi = pad
    b, ho, wo, _ = g.shape
    hp, wp = x_shape[1] + lo + hi, x_shape[2] + lo + hi
    # (B, ho, wo, k, k, Cin), summed in float32 (as a convolution accumulates), cast once.
    u = jnp.einsum("bhwo,yxio->bhwyxi", g, kernel, preferred_element_type=F32)
    zero = jnp.zeros((), F32)
    dxp = jnp.zeros((b, hp, wp, cin), F32)
    for dy in range(k):
        for dx in range(k):
            cfg = [
                (0, 0, 0),
                (dy, hp - dy - stride * (ho - 1) - 1, stride - 1),
                (dx, wp - dx - stride * (wo - 1) - 1, stride - 1),
                (0, 0, 0),
            ]
            dxp = dxp + jax.lax.pad(u[:, :, :, dy, dx], zero, cfg)
    return dxp[:, lo : lo + x_shape[1], lo : lo + x_shape[2]].astype(g.dtype)


def _conv2d_fwd(x, kernel, bias, stride, dtype, out_dtype, pad):
    out = _conv2d(x, kernel, bias, stride, _pad_of(kernel, pad), dtype, out_dtype)
    return out, (x, kernel)


def _conv2d_bwd(stride, dtype, out_dtype, pad, res, g):
    x, kernel = res
    k = kernel.shape[0]
    lo, hi = _pad_of(kernel, pad)
    out_hw = g.shape[1:3]
    gd = g.astype(dtype)
    if stride == 1:
        # The transposed convolution, as autodiff traces it (at stride 1 a plain convolution).
        _, vjp_x = jax.vjp(lambda v: _conv(v, kernel, stride, (lo, hi), dtype), x.astype(dtype))
        (dx,) = vjp_x(gd)
    else:
        dx = _strided_input_grad(gd, kernel.astype(dtype), stride, (lo, hi), x.shape)
    xp = _pad_hw(x.astype(dtype), lo, hi)
    taps = _taps(xp, k, stride, out_hw)
    cout = kernel.shape[-1]
    gf = g.astype(F32)
    if cout <= _FEW_OUTPUTS:
        # Few output channels (the heads): per tap and output channel, a float32 sum of
        # (pixels, Cin) products, all in one reduction (a matrix product would first transpose
        # each tap's (pixels, Cin) view, 40 ms apiece at 512 x 512 x 32 on a CPU).
        terms = [v.astype(F32) * gf[..., o : o + 1] for v in taps for o in range(cout)]
        dk = jnp.stack(_pixel_sums(terms)).reshape(k * k, cout, -1).swapaxes(1, 2)
    else:
        # Per tap, (pixels, Cin)^T @ (pixels, Cout), accumulated in float32.
        dk = jnp.stack(
            [jnp.einsum("bhwi,bhwo->io", v, gd, preferred_element_type=F32) for v in taps]
        )
    db = jnp.sum(gf, axis=(0, 1, 2))
    return dx.astype(x.dtype), dk.reshape(kernel.shape), db


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


# ------------------------------------------------------------------------- pointwise


def _pointwise(x, kernel, bias, dtype):
    return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def pointwise_conv(x: Array, kernel: Array, bias: Array, dtype: Any) -> Array:
    """1 x 1 convolution as a product over channels: (..., Cin) -> (..., Cout) in ``dtype``.

    kernel (Cin, Cout), bias (Cout,) float32 (``nn.Conv(Cout, (1, 1))``'s kernel is
    (1, 1, Cin, Cout)); parameter gradients summed in float32.
    """
    return _pointwise(x, kernel, bias, dtype)


def _pointwise_fwd(x, kernel, bias, dtype):
    return _pointwise(x, kernel, bias, dtype), (x, kernel)


def _pointwise_bwd(dtype, res, g):
    x, kernel = res
    gd = g.astype(dtype)
    dx = jnp.dot(gd, kernel.astype(dtype).T)
    dk = jnp.einsum("...i,...o->io", x.astype(dtype), gd, preferred_element_type=F32)
    db = jnp.sum(g.astype(F32), axis=tuple(range(g.ndim - 1)))
    return dx.astype(x.dtype), dk, db


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)
