"""The refiners' GroupNorm (samref_jax/refiners/norm.py): forward and hand-written backward pass
against flax's ``nn.GroupNorm`` differentiated by JAX, with and without jit."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samref_jax.refiners.norm import group_norm
from samref_jax.refiners.refiner import GroupNorm

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
