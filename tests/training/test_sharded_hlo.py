"""The compiled data-parallel training step holds no cross-device collective inside any loop.

Four fake CPU devices (a subprocess: the device count is fixed at JAX start-up), the tiny
config, T = 2 click rounds, a global batch of 4, with and without ``train.remat``: the whole
``make_train_step`` is lowered and compiled, and ``samref_jax.training.hlo.loop_collectives``
walks the optimized HLO -- every ``while`` body and condition (the rounds' scan, its backward
pass, the clicker's loops) and every computation they call. None may hold an all-reduce,
all-gather, reduce-scatter, collective-permute or all-to-all; the gradient all-reduce must sit
outside them. A probe loop whose condition reduces over the sharded batch shows that the walk
finds in-loop collectives.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.fake_devices import run_script

_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from samref_jax.training import step as S
    from samref_jax.training.hlo import loop_collectives
    from samref_jax.training.testing import synthetic_batch, tiny_test_config

    assert jax.device_count() == 4, jax.devices()
    mesh = S.make_mesh()

    # The walk sees a collective in a loop: a while whose condition reduces over the batch.
    def reduce_loop(x):
        return jax.lax.while_loop(
            lambda c: c[0] < c[1].max(), lambda c: (c[0] + 1, c[1]), (jnp.int32(0), x)
        )[0]

    probe = jax.jit(jax.vmap(reduce_loop), in_shardings=S.batch_sharding(mesh))
    r = loop_collectives(probe.lower(jnp.arange(8)).compile().as_text())
    assert r.loops >= 1 and r.inside, r

    for remat in (False, True):  # the accelerator recipes recompute rounds (train.remat)
        cfg = tiny_test_config("full", 64, rounds=2)
        cfg.train.remat = remat
        params = S.init_params(cfg, jax.random.key(0, impl="rbg"))
        state = S.put_replicated(S.create_state(cfg, params, 0), mesh)
        batch = S.shard_batch(synthetic_batch(4, 64, seed=7), mesh)
        assert len(batch["image"].sharding.device_set) == 4
        step = S.make_train_step(cfg, mesh, params, donate=False)
        compiled = step.lower(state, batch).compile()
        r = loop_collectives(compiled.as_text())
        assert r.loops >= 2, "expected the rounds' scan and its backward pass as loops"
        assert not r.inside, (remat, r.inside)
        assert any("all-reduce" in ln for ln in r.outside), "no gradient all-reduce found"
        new, metrics = compiled(state, batch)
        assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
    print("OK", r.loops, len(r.outside))
    """
)


@pytest.mark.slow
def test_sharded_step_has_no_collective_in_loops():
    """4 fake CPU devices: the compiled sharded train step's loops hold no collective; its
    all-reduce (gradients, loss, metrics) runs once, after the unroll."""
    run_script(_SCRIPT, timeout=900)
