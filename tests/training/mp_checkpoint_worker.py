"""One process of ``test_multiprocess.py``'s checkpoint tests (started by ``launch``).

``python -m tests.training.mp_checkpoint_worker MODE FOLDER`` in every process of a
``jax.distributed`` run; the state is ``w`` (4M float32, sharded over all devices of all
processes: each process writes its own shards) and ``b`` (replicated):

* ``donate``: save step 1, a jitted update that donates the state, save step 2, delete the
  arrays (as the next step's donation does); the newest checkpoint is step 2 and restores
  the values of step 2 onto the same shardings;
* ``kill``: save step 1 and wait, save step 2, then SIGKILL while the background write runs;
* ``resume``: restore the newest checkpoint (printing its step), save the next step over
  whatever the killed write left, and restore that.

Prints ``ok <step>`` on success.
"""

from __future__ import annotations

import os
import signal
import sys

from samref_jax.training.distributed import initialize

N = 1 << 22


def main() -> None:
    mode, folder = sys.argv[1], sys.argv[2]
    initialize()
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from samref_jax.training.checkpointing import TrainCheckpointer

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    shardings = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
    host = {"w": np.arange(N, dtype=np.float32), "b": np.full(3, 0.5, np.float32)}

    def state(step: float) -> dict:
        return {
            k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i] + step)
            for k, v in host.items()
        }

    def check(restored: dict, step: float) -> None:
        for k, v in restored.items():
            assert v.sharding == shardings[k], (k, v.sharding)
            for shard in v.addressable_shards:  # this process's part
                np.testing.assert_array_equal(np.asarray(shard.data), host[k][shard.index] + step)

    ck = TrainCheckpointer(folder, 3)
    template = state(0.0)
    if mode == "donate":
        ck.save(1, state(1.0), {"step": 1})
        s = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x + 1, s), donate_argnums=0)(
            state(1.0)
        )
        ck.save(2, s, {"step": 2})  # waits for step 1's write, then starts its own
        for v in jax.tree_util.tree_leaves(s):
            v.delete()
        assert ck.latest_step() == 2, ck.latest_step()
        restored, data = ck.restore_latest(template)
        assert data == {"step": 2}, data
        check(restored, 2.0)
        step = 2
    elif mode == "kill":
        ck.save(1, state(1.0), {"step": 1})
        ck.wait()
        ck.save(2, state(2.0), {"step": 2})
        os.kill(os.getpid(), signal.SIGKILL)  # while the files of step 2 are written
    elif mode == "resume":
        restored, data = ck.restore_latest(template)
        step = int(data["step"])
        assert step in (1, 2) and ck.latest_step() == step, (step, ck.latest_step())
        check(restored, float(step))
        print(f"resumed {step}", flush=True)
        ck.save(step + 1, state(step + 1.0), {"step": step + 1})
        assert ck.latest_step() == step + 1
        restored, data = ck.restore_latest(template)
        check(restored, step + 1.0)
        step += 1
    ck.close()
    print(f"ok {step}", flush=True)


if __name__ == "__main__":
    main()
