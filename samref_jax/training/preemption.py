"""Preemption: on the scheduler's notice (SIGTERM), every process stops at the same step.

Cluster schedulers (Cloud TPU and GPU VMs, Kubernetes, Slurm) announce an eviction with SIGTERM
some seconds before they kill the job. The trainer asks :meth:`PreemptionWatch.reached` after
every step; when it answers True, the trainer writes a checkpoint of that step and stops
without the final evaluation and export, so the rerun of the same command resumes there
instead of at the last periodic checkpoint (docs/training.md, 'Several devices and
processes').

* Several processes (``jax.distributed``): JAX's preemption service catches SIGTERM on
  whichever host receives it, tells the others, and agrees on one step that every process
  reaches (``multihost_utils.reached_preemption_sync_point``): orbax's save is collective, so
  all of them must save the same step.
* One process: a Python SIGTERM handler (installed for the ``with`` block, then the previous
  one is put back) sets a flag that the next call reads.

Example:
  >>> with PreemptionWatch() as watch:                                        # doctest: +SKIP
  ...     for step in range(start, num_steps):
  ...         state = train_step(state)
  ...         if watch.reached(step + 1):
  ...             save(step + 1)
  ...             break
"""

from __future__ import annotations

import signal
import threading
from typing import Any

# Exit status of a training command stopped by a preemption notice, as if SIGTERM had ended it.
PREEMPTED_EXIT_STATUS = 128 + int(signal.SIGTERM)


class PreemptionWatch:
    """Context manager answering "stop here?" after each step (module docstring)."""

    def __init__(self) -> None:
        import jax  # here: launchers import this module's exit status without JAX

        self.distributed = jax.process_count() > 1
        self.noticed = False  # one process: SIGTERM arrived
        self._previous: Any = None
        self._installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.noticed = True

    def __enter__(self) -> PreemptionWatch:
        # jax.distributed's preemption service owns SIGTERM when there are several processes;
        # Python can only install handlers from the main thread.
        if not self.distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def reached(self, step: int) -> bool:
        """True when training should checkpoint ``step`` (the step just completed) and stop.

        Every process must call this after every step, with the same ``step``."""
        if self.distributed:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self.noticed


def notify_self() -> None:
    """Sends this process SIGTERM, as a scheduler's preemption notice would (tests)."""
    signal.raise_signal(signal.SIGTERM)
