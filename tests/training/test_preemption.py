"""``PreemptionWatch`` in one process: SIGTERM inside the ``with`` block is a notice, not an
exit, and the previous handler is back afterwards (the trainer's use: tests/training/
test_training.py and, across processes, test_multiprocess.py)."""

from __future__ import annotations

import signal

from samref_jax.training.preemption import PREEMPTED_EXIT_STATUS, PreemptionWatch, notify_self


def test_sigterm_is_a_notice_inside_the_block_only():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("outer"))
    try:
        with PreemptionWatch() as watch:
            assert not watch.distributed
            assert not watch.reached(1)
            notify_self()
            assert watch.reached(2) and seen == []
        notify_self()  # the outer handler again
        assert seen == ["outer"]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert PREEMPTED_EXIT_STATUS == 143
