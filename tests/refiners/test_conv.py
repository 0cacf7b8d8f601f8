"""The refiners' convolutions (samref_jax/refiners/conv.py): forward and hand-written backward
passes against XLA's convolution differentiated by JAX, with and without jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samref_jax.refiners.conv import conv2d, depthwise_conv, pointwise_conv

F32 = jnp.float32


def _ref_depthwise(x, kernel, bias):
    k, c = kernel.shape[0], kernel.shape[-1]
    y = jax.lax.conv_general_dilated(
        x,
        kernel.reshape(k, k, 1, c),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )
    return y + bias


def _ref_conv(stride, pad):
    def f(x, kernel, bias):
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            (pad, pad),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        return y + bias

    return f


def _inputs(seed, x_shape, k_shape):
    kx, kk, kb, kg = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, x_shape, F32)
    kernel = jax.random.normal(kk, k_shape, F32) * 0.3
    bias = jax.random.normal(kb, k_shape[-1:], F32)
    return x, kernel, bias, kg


def _vjp_all(f, x, kernel, bias, kg):
    y, vjp = jax.vjp(f, x, kernel, bias)
    g = jax.random.normal(kg, y.shape, F32).astype(y.dtype)
    return (y, *vjp(g))


def _close(got, want, rtol):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=rtol * scale, rtol=0)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("k", [3, 4])
def test_depthwise_matches_grouped_conv_and_its_gradients(use_jit, k):
    x, kernel, bias, kg = _inputs(0, (2, 11, 9, 5), (k, k, 5))
    run = jax.jit(_vjp_all, static_argnums=0) if use_jit else _vjp_all
    got = run(lambda *a: depthwise_conv(*a, F32), x, kernel, bias, kg)
    want = run(_ref_depthwise, x, kernel, bias, kg)
    _close(got, want, 1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize(
    "k,stride,pad",
    [
        (3, 2, (1, 1)),
        (3, 1, (1, 1)),
        (4, 1, (1, 2)),
        (3, 2, (1, 2)),
        (1, 1, (0, 0)),
        (3, 2, (0, 0)),
        (2, 3, (0, 1)),
    ],
)
@pytest.mark.parametrize("cout", [2, 6])  # 2: the few-outputs kernel gradient (the heads)
def test_conv2d_matches_xla_conv_and_its_gradients(use_jit, k, stride, pad, cout):
    x, kernel, bias, kg = _inputs(1, (2, 12, 10, 7), (k, k, 7, cout))
    run = jax.jit(_vjp_all, static_argnums=0) if use_jit else _vjp_all
    got = run(lambda *a: conv2d(*a, stride, F32, pad=pad), x, kernel, bias, kg)
    want = run(_ref_conv(stride, pad), x, kernel, bias, kg)
    _close(got, want, 1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_pointwise_matches_a_dense_layer_and_its_gradients(use_jit):
    x, kernel, bias, kg = _inputs(4, (2, 6, 5, 7), (7, 3))
    run = jax.jit(_vjp_all, static_argnums=0) if use_jit else _vjp_all
    got = run(lambda *a: pointwise_conv(*a, F32), x, kernel, bias, kg)
    want = run(lambda x, k, b: jnp.dot(x, k, precision="highest") + b, x, kernel, bias, kg)
    _close(got, want, 1e-5)


def test_conv2d_default_padding_is_same_and_out_dtype_applies():
    x, kernel, bias, _ = _inputs(2, (1, 8, 8, 3), (3, 3, 3, 2))
    y = conv2d(x, kernel, bias, 1, jnp.bfloat16, F32)
    assert y.shape == (1, 8, 8, 2) and y.dtype == F32
    want = _ref_conv(1, (1, 1))(x, kernel, bias)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(want), atol=0.05 * float(jnp.abs(want).max())
    )


@pytest.mark.parametrize("op", ["depthwise", "conv2d", "conv2d_heads", "pointwise"])
def test_bf16_parameter_gradients_are_float32_sums(op):
    """In a bf16 layer the parameter gradients are float32 sums over every pixel: within 1% of
    the float32 layer's (autodiff of the bf16 layer sums in bf16: 3.5-7% off here)."""
    n = 96
    if op == "depthwise":
        x, kernel, bias, kg = _inputs(3, (1, n, n, 8), (3, 3, 8))
        f = lambda dt: lambda *a: depthwise_conv(*a, dt)  # noqa: E731
    elif op.startswith("conv2d"):
        cout = 2 if op == "conv2d_heads" else 6
        x, kernel, bias, kg = _inputs(3, (1, n, n, 8), (3, 3, 8, cout))
        f = lambda dt: lambda *a: conv2d(*a, 2, dt, pad=(1, 1))  # noqa: E731
    else:
        x, kernel, bias, kg = _inputs(3, (1, n, n, 8), (8, 4))
        f = lambda dt: lambda *a: pointwise_conv(*a, dt)  # noqa: E731
    x = x + 3.0  # same-sign inputs: the sums grow with the pixel count
    _, _, dk32, db32 = jax.jit(_vjp_all, static_argnums=0)(f(F32), x, kernel, bias, kg)
    y16, dx16, dk16, db16 = jax.jit(_vjp_all, static_argnums=0)(
        f(jnp.bfloat16), x, kernel, bias, kg
    )
    assert y16.dtype == jnp.bfloat16 and dx16.dtype == F32
    assert dk16.dtype == F32 and db16.dtype == F32
    for got, want in ((dk16, dk32), (db16, db32)):
        # bf16 autodiff of these layers: 0.035-0.07 here; float32 sums: 0.001-0.003
        rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert rel < 1e-2, rel


@pytest.mark.parametrize("use_jit", [False, True])
def test_bf16_depthwise_rounds_once(use_jit):
    """A bf16 depthwise layer (forward and input gradient) is the float32 layer on the
    bf16-rounded inputs and weights, rounded to bf16 once: no rounding between its k*k
    multiply-adds."""
    x, kernel, bias, kg = _inputs(5, (2, 9, 7, 6), (3, 3, 6))
    bf = jnp.bfloat16
    r = lambda a: a.astype(bf).astype(F32)  # noqa: E731
    run = jax.jit(_vjp_all, static_argnums=0) if use_jit else _vjp_all
    y16, dx16, _, _ = run(lambda *a: depthwise_conv(*a, bf), x, kernel, bias, kg)
    y32, _, _, _ = run(lambda *a: depthwise_conv(*a, F32), r(x), r(kernel), r(bias), kg)
    np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(bf)))
    _, vjp = jax.vjp(lambda v: depthwise_conv(v, r(kernel), jnp.zeros_like(bias), F32), x)
    (dx32,) = vjp(r(jax.random.normal(kg, y16.shape, F32)))  # the cotangent _vjp_all draws
    np.testing.assert_array_equal(np.asarray(dx16), np.asarray(dx32.astype(bf).astype(F32)))


def test_bf16_padding_keeps_bits_and_is_not_rounded_per_tap():
    """A bf16 map is padded as its bits (``conv._pad_hw``): the same values as ``jnp.pad``
    (signed zeros and NaNs included), and in the optimised CPU program of a bf16 layer's
    gradient no padded map is rounded from float32 to bf16 (XLA:CPU pads bf16 in float32; a
    plain ``jnp.pad`` left the padded copy rounded once per tap: nine roundings per element)."""
    import re

    from samref_jax.refiners.conv import _pad_hw

    bf = jnp.bfloat16
    x = jnp.asarray([[-0.0, 1.5], [jnp.nan, -3.25]], bf).reshape(1, 2, 2, 1)
    bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))  # noqa: E731
    want = jnp.pad(x, ((0, 0), (1, 2), (1, 2), (0, 0)))
    assert _pad_hw(x, 1, 2).dtype == bf
    np.testing.assert_array_equal(bits(_pad_hw(x, 1, 2)), bits(want))
    xf = jnp.ones((1, 4, 4, 2), F32)
    np.testing.assert_array_equal(_pad_hw(xf, 1, 1), jnp.pad(xf, ((0, 0), (1, 1), (1, 1), (0, 0))))

    x = jnp.ones((1, 16, 16, 8), bf)
    b = jnp.zeros((8,), F32)
    layers = {
        "depthwise": lambda v: depthwise_conv(jnp.cos(v), jnp.ones((3, 3, 8)), b, bf),
        "conv2d": lambda v: conv2d(jnp.cos(v), jnp.ones((3, 3, 8, 8)), b, 2, bf),
    }
    for name, layer in layers.items():
        loss = lambda v, f=layer: jnp.sum(jnp.sin(f(v).astype(F32)))  # noqa: E731
        hlo = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
        assert not re.findall(r"= bf16\[1,18,18,8\]\S* convert\(", hlo), name
