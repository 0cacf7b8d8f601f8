"""Host-side runtime settings: glibc's malloc tuned for XLA:CPU's allocation pattern.

XLA:CPU's kernels and their GEMM libraries allocate and free scratch blocks of up to tens of MB
on every call. glibc serves blocks above its (adaptive) mmap threshold with fresh ``mmap``
pages, which the kernel faults in and zeroes on first touch, and unmaps them again on ``free``:
one vit_b encoder pass took about 2.2 million page faults (8 GB of zeroed pages) on this
project's CPU machine. With the mmap threshold at glibc's maximum (32 MiB) and freed memory kept
in the heap (trim threshold 1 GiB), the same pass takes about 0.1 million faults and about 13 s
instead of 17-20 s (docs/design.md, 'Host malloc'). Results are bit-identical; the cost is that
memory freed by the process is kept for reuse instead of being returned to the OS at once.

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
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

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
        _applied = all(
            mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD),
            )
        )
    return _applied
