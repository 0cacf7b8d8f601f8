"""The training input pipeline with Grain worker processes (``data.num_workers >= 2``).

The trainer stores ``it.get_state()`` in the ``data`` item of each training checkpoint
(``TrainCheckpointer``, orbax JSON) and calls ``it.set_state`` on resume: with worker processes
the restored iterator must yield exactly the batches the interrupted one would have. Only
process 0 writes that item; with several processes every process restores it, which is right
because their iterator states are equal (each process reads its slice of one batch stream).

It runs in a fresh interpreter, as ``train.main`` does: there the global absl flags are never
parsed (``train.main`` parses its own ``FlagValues``), and Grain's worker pool reads them; the
iterator under test is the one ``train()`` itself builds.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.fake_devices import run_script

_SCRIPT = textwrap.dedent(
    """
    import gc, sys
    import numpy as np
    from absl import flags
    from samref_jax.training import step as S
    from samref_jax.training import trainer
    from samref_jax.training.checkpointing import TrainCheckpointer
    from samref_jax.training.pipeline import make_train_dataset
    from samref_jax.training.testing import tiny_test_config, write_fake_coco_mval

    tmp = sys.argv[1]
    assert not flags.FLAGS.is_parsed()
    cfg = tiny_test_config("full", 64)
    cfg.data.manual_dir = str(write_fake_coco_mval(tmp + "/COCO_MVal", n=5))
    cfg.data.num_workers = 2

    class Stop(Exception):
        pass

    made = []

    class Recorded:  # the trainer's dataset; keeps the iterator train() makes of it
        def __init__(self, ds):
            self.ds = ds

        def __iter__(self):
            made.append(iter(self.ds))
            return made[-1]

    real = trainer.make_train_dataset
    trainer.make_train_dataset = lambda *a, **k: Recorded(real(*a, **k))
    S.make_mesh = lambda *a, **k: (_ for _ in ()).throw(Stop())  # stop before the model
    try:
        trainer.train(cfg, tmp + "/run", progress=False)
    except Stop:
        pass
    (it,) = made
    source = trainer.prepare_source(cfg, tmp + "/run/tfds")  # prepared by train()

    def same(a, b):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)

    first = [next(it) for _ in range(3)]  # 3 batches of 2: past the 4 training examples
    ckpt = TrainCheckpointer(tmp + "/run/checkpoints")
    state = {"w": np.arange(3, dtype=np.float32)}
    ckpt.save(3, state, {"iterator": it.get_state(), "minutes_used": 0.0})
    expected = [next(it) for _ in range(3)]
    del it, made[:]
    gc.collect()

    restored, data = ckpt.restore_latest(state)
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
    it2 = iter(make_train_dataset(cfg, source))
    it2.set_state(data["iterator"])
    same([next(it2) for _ in range(3)], expected)
    del it2
    gc.collect()

    # Several processes: process i of n reads batches i, i + n, ... of the global stream, so
    # after k steps every process's iterator state is the same, and the checkpoint's (process
    # 0's: orbax writes the JSON item from process 0 only) puts every process where it was.
    states, after = [], []
    for pi in (0, 3):
        itp = iter(make_train_dataset(cfg, source, process_index=pi, process_count=4))
        for _ in range(2):
            next(itp)
        states.append(itp.get_state())
        after.append([next(itp) for _ in range(2)])
        del itp
        gc.collect()
    assert states[0] == states[1], states
    assert not np.array_equal(after[0][0]["image"], after[1][0]["image"])  # other batches
    it3 = iter(make_train_dataset(cfg, source, process_index=3, process_count=4))
    it3.set_state(states[0])
    same([next(it3) for _ in range(2)], after[1])
    del it3
    gc.collect()

    # The worker processes change nothing in the data: in process (0 workers), same batches.
    cfg.data.num_workers = 0
    it0 = iter(make_train_dataset(cfg, source))
    same([next(it0) for _ in range(6)], first + expected)
    assert first[0]["image"].shape == (2, 64, 64, 3), first[0]["image"].shape
    # Nor do Grain's read threads and its prefetch depth.
    cfg.data.read_threads, cfg.data.prefetch_batches = 0, 1
    it1 = iter(make_train_dataset(cfg, source))
    same([next(it1) for _ in range(6)], first + expected)
    print("OK")
    """
)


@pytest.mark.slow
def test_worker_iterator_checkpoint_restores_the_next_batches(tmp_path):
    run_script(_SCRIPT, timeout=600, args=(str(tmp_path),))
