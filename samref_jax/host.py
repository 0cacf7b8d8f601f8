"""Host-side runtime settings: glibc's malloc tuned for XLA:CPU's allocation pattern.

XLA:CPU allocates each executable's temporary buffer (1.4 GiB for the vit_b recipe's training
step) and its kernels' scratch blocks (up to tens of MB) on every call, from its worker
threads. glibc serves large blocks with fresh ``mmap`` pages, which the kernel faults in and
zeroes on first touch, and unmaps them on ``free``; a worker thread's own arena does so for any
block too large for its 64 MiB heaps whatever the mmap limits say. Measured on this project's
CPU machine: one vit_b encoder pass took about 2.2 million page faults, and the cached-embedding
training step about 376 thousand (its whole temporary buffer, every step; 1.5-1.8 s of kernel
time).

``tune_malloc`` puts every thread on glibc's main arena, never maps blocks of their own, and
never trims the heap: freed memory is reused by the next call, so a step or a pass takes almost
no page faults (docs/design.md, 'Host malloc'). Results are bit-identical. The cost: memory the
process frees is kept for reuse, not returned to the OS (the resident size stays at its peak),
and all threads share one arena's lock. The settings bind threads that have not allocated yet,
so call it before JAX runs anything: ``samref``, ``samref-eval``, ``samref-train`` and the
benchmarks call it first, the trainer and the predictors when they are built.

>>> from samref_jax.host import tune_malloc
>>> applied = tune_malloc()  # True on glibc (Linux) unless SAMREF_DEFAULT_MALLOC=1
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["tune_malloc"]

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main arena (grown by brk, no mmap)
    (_M_MMAP_MAX, 0),  # no block gets pages of its own
    (_M_TRIM_THRESHOLD, -1),  # -1: never give the heap's top back to the kernel
    (_M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB beyond each request
)

_applied: bool | None = None


def tune_malloc() -> bool:
    """Applies the settings above once per process; returns whether they are in effect.

    Called by the predictors, the CLI, the evaluator and the trainer. A no-op returning False
    where the C library has no glibc ``mallopt`` (macOS, Windows, musl) or when the environment
    sets ``SAMREF_DEFAULT_MALLOC=1``.
    """
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("SAMREF_DEFAULT_MALLOC", "") not in ("", "0"):
            return False
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018  (glibc only)
            mallopt = libc.mallopt
        except (AttributeError, OSError):
            return False
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _applied
