"""The refiners' GroupNorm (samref_jax/refiners/norm.py): forward and hand-written backward pass
against flax's ``nn.GroupNorm`` differentiated by JAX, with and without jit."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samref_jax.refiners.norm import group_norm, group_norm_act
from samref_jax.refiners.refiner import GroupNorm
from samref_jax.sam.common import gelu

F32 = jnp.float32


def _inputs(seed, shape):
    kx, ks, kb, kg, ko = jax.random.split(jax.random.key(seed), 5)
    c = shape[-1]
    # Per-channel offsets and scales, so the groups' statistics differ.
    x = jax.random.normal(kx, shape, F32) * (1 + jnp.arange(c)) / c + jax.random.normal(ko, (c,))
    scale = 1 + 0.5 * jax.random.normal(ks, (c,), F32)
    bias = jax.random.normal(kb, (c,), F32)
    g = jax.random.normal(kg, shape, F32)
    return x, scale, bias, g


def _flax(groups, eps):
    def f(x, scale, bias):
        mod = nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=F32)
        return mod.apply({"params": {"scale": scale, "bias": bias}}, x)

    return f


def _vjp(f, x, scale, bias, g):
    y, vjp = jax.vjp(f, x, scale, bias)
    return (y, *vjp(g.astype(y.dtype)))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize(
    "shape,groups", [((2, 9, 7, 8), 4), ((1, 16, 16, 32), 8), ((3, 5, 6, 6), 1)]
)
def test_group_norm_matches_flax_forward_and_gradients(shape, groups, use_jit):
    x, scale, bias, g = _inputs(0, shape)
    ours = lambda x, s, b: group_norm(x, s, b, groups, 1e-5, F32)  # noqa: E731
    ref = _flax(groups, 1e-5)
    if use_jit:
        ours, ref = jax.jit(ours), jax.jit(ref)
    got, want = _vjp(ours, x, scale, bias, g), _vjp(ref, x, scale, bias, g)
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(
            a, b, rtol=2e-4, atol=2e-4 * float(jnp.abs(b).max()), err_msg=name
        )


def test_group_norm_bf16_gradients_close_to_float32():
    # bf16 input and output, float32 statistics and parameter gradients.
    x, scale, bias, g = _inputs(1, (2, 32, 32, 16))
    xb = x.astype(jnp.bfloat16)
    f32 = _vjp(_flax(4, 1e-5), xb.astype(F32), scale, bias, g)
    bf = _vjp(lambda x, s, b: group_norm(x, s, b, 4, 1e-5, jnp.bfloat16), xb, scale, bias, g)
    assert bf[0].dtype == jnp.bfloat16 and bf[1].dtype == jnp.bfloat16
    assert bf[2].dtype == F32 and bf[3].dtype == F32
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), bf, f32, strict=True):
        err = float(jnp.abs(a.astype(F32) - b).max() / jnp.abs(b).max())
        assert err < 2e-2, (name, err)


def test_group_norm_module_params_and_errors():
    x, *_ = _inputs(2, (1, 4, 4, 6))
    params = GroupNorm(num_groups=3).init(jax.random.key(0), x)["params"]
    assert {k: v.shape for k, v in params.items()} == {"scale": (6,), "bias": (6,)}
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        GroupNorm(num_groups=4).init(jax.random.key(0), x)


def _vjp_skip(f, x, scale, bias, skip, g):
    y, vjp = jax.vjp(f, x, scale, bias, skip)
    return (y, *vjp(g.astype(y.dtype)))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("act", [gelu, jax.nn.relu, jax.nn.silu])
@pytest.mark.parametrize("with_skip", [False, True])
def test_group_norm_act_matches_composition(act, with_skip, use_jit):
    """float32: act(GroupNorm(x) + skip) with the hand-written backward pass equals flax's
    GroupNorm, the addition and the activation differentiated by JAX."""
    x, scale, bias, g = _inputs(3, (2, 9, 7, 8))
    skip = jax.random.normal(jax.random.key(9), x.shape, F32)
    s = skip if with_skip else jnp.zeros_like(skip)

    def ours(x, sc, b, sk):
        return group_norm_act(x, sc, b, sk if with_skip else None, 4, 1e-5, F32, act)

    def ref(x, sc, b, sk):
        return act(_flax(4, 1e-5)(x, sc, b) + sk)

    if use_jit:
        ours, ref = jax.jit(ours), jax.jit(ref)
    got, want = _vjp_skip(ours, x, scale, bias, s, g), _vjp_skip(ref, x, scale, bias, s, g)
    names = ("y", "dx", "dscale", "dbias", "dskip")
    for name, a, b in zip(names, got, want, strict=True):
        if name == "dskip" and not with_skip:
            assert not np.any(np.asarray(a)), name  # skip=None: no gradient
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(
            a, b, rtol=2e-4, atol=2e-4 * float(jnp.abs(b).max()), err_msg=name
        )


def test_group_norm_act_bf16_rounds_once():
    """bf16: the output is the float32 function of the bf16 input rounded once (closer to it
    than GroupNorm, addition and GELU each rounded to bf16); gradients within 2% of float32's."""
    x, scale, bias, g = _inputs(4, (2, 32, 32, 16))
    xb = x.astype(jnp.bfloat16)
    skip = jax.random.normal(jax.random.key(8), x.shape, F32).astype(jnp.bfloat16)
    fused = _vjp_skip(
        lambda x, s, b, k: group_norm_act(x, s, b, k, 4, 1e-5, jnp.bfloat16, gelu),
        xb, scale, bias, skip, g,
    )  # fmt: skip
    f32 = _vjp_skip(
        lambda x, s, b, k: group_norm_act(x, s, b, k, 4, 1e-5, F32, gelu),
        xb.astype(F32), scale, bias, skip.astype(F32), g,
    )  # fmt: skip
    assert fused[0].dtype == jnp.bfloat16 and fused[1].dtype == jnp.bfloat16
    assert fused[4].dtype == jnp.bfloat16 and fused[2].dtype == F32
    np.testing.assert_array_equal(
        np.asarray(fused[0].astype(F32)), np.asarray(f32[0].astype(jnp.bfloat16).astype(F32))
    )
    chained = gelu(skip + group_norm(xb, scale, bias, 4, 1e-5, jnp.bfloat16))
    err_chain = float(jnp.abs(chained.astype(F32) - f32[0]).mean())
    err_fused = float(jnp.abs(fused[0].astype(F32) - f32[0]).mean())
    assert err_fused < 0.8 * err_chain, (err_fused, err_chain)
    for name, a, b in zip(("dx", "dscale", "dbias", "dskip"), fused[1:], f32[1:], strict=True):
        err = float(jnp.abs(a.astype(F32) - b).max() / jnp.abs(b).max())
        assert err < 2e-2, (name, err)


def test_group_norm_module_skip_needs_act():
    x, *_ = _inputs(2, (1, 4, 4, 6))
    mod = GroupNorm(num_groups=3)
    params = mod.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="skip is only added before an activation"):
        mod.apply(params, x, skip=x)
