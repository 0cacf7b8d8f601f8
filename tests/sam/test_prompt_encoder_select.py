"""SAM's prompt encoder with ``mask_cond=False`` (training: per-row select, no batch-wide
``cond``) gives the values of the default ``cond`` form (inference) in every row, for the dense
prompt and its factored form, and its program holds no ``cond``."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samref_jax.sam import sam_config
from samref_jax.sam.prompt_encoder import PromptEncoder

CFG = sam_config("tiny")


@pytest.fixture(scope="module")
def params():
    # The prompt encoder alone (SAM's other parts play no role here).
    coords, labels, mask, has_mask = _inputs([True])
    return PromptEncoder(CFG).init(jax.random.key(0), coords, labels, mask, has_mask)["params"]


def _inputs(has_mask):
    rng = np.random.default_rng(3)
    b, low = len(has_mask), CFG.low_res_mask_size
    coords = jnp.asarray(rng.uniform(0, CFG.img_size, (b, 3, 2)), jnp.float32)
    labels = jnp.asarray([[1, 0, -1]] * b, jnp.int32)
    mask = jnp.asarray(rng.normal(size=(b, low, low)) * 3, jnp.float32)
    return coords, labels, mask, jnp.asarray(has_mask)


def _prompt(mask_cond):
    def fn(p, coords, labels, mask, has_mask):
        m = PromptEncoder(CFG, mask_cond=mask_cond)

        def enc(mod):
            _, _, dense = mod(coords, labels, mask, has_mask)
            factors = mod.dense_factors(mask, has_mask)
            return dense, factors.features, factors.bias

        return m.apply({"params": p}, method=enc)

    return fn


@pytest.mark.parametrize(
    "has_mask", [[False, False, False], [True, False, True], [True, True, True]]
)
def test_select_equals_cond_per_row(params, has_mask):
    args = _inputs(has_mask)
    want = jax.jit(_prompt(True))(params, *args)
    got = jax.jit(_prompt(False))(params, *args)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_select_form_has_no_cond(params):
    args = _inputs([True, False, True])
    # The printed jaxpr shows nested programs inline; a cond equation reads "cond[".
    with_cond = str(jax.make_jaxpr(_prompt(True))(params, *args))
    without = str(jax.make_jaxpr(_prompt(False))(params, *args))
    assert re.search(r"\bcond\[", with_cond), with_cond
    assert not re.search(r"\bcond\[", without), without
