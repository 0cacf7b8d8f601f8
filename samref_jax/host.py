"""Host-side runtime settings: glibc's malloc tuned for XLA:CPU's allocation pattern.

XLA:CPU allocates, on every call of a compiled program and from its worker threads, scratch
blocks of up to tens of MB and the program's temporary buffer (1.4 GiB for the vit_b recipe's
training step). glibc serves large blocks with fresh ``mmap`` pages, which the kernel faults in
and zeroes on first touch, and unmaps them again on ``free``.

``tune_malloc()`` sets glibc's mmap threshold to its maximum (32 MiB) and keeps freed memory in
the heap (trim threshold 1 GiB): one vit_b encoder pass then takes about 0.1 million page faults
instead of 2.2 million, and 13 s instead of 17-20 s on this project's CPU machine.

Blocks above 32 MiB are still mapped per call, and a worker thread's own arena maps any block
larger than its 64 MiB heaps whatever the limits say: the vit_b training step faults in its
whole temporary buffer every step (376 thousand faults, 1.5 s of kernel time). The
*single-arena* setting (``tune_malloc(single_arena=True)`` or ``SAMREF_SINGLE_ARENA=1``) also
puts every thread on the main arena, gives no block pages of its own and never trims the heap:
that step then takes almost no faults and about 15% less time, but all threads share one
arena's lock, which makes compilation about 25% slower and small programs slower (a vit_b
``full`` click 66.5-70.5 ms against 60.1-63.1 ms), so it is for long CPU runs of large programs
(docs/design.md, 'Host malloc'). Results are bit-identical either way; freed memory is kept for
reuse instead of being returned to the OS at once. The arena setting binds threads that have not
allocated yet, so apply it before JAX runs anything (``samref``, ``samref-eval`` and
``samref-train`` call ``tune_malloc()`` first thing).

>>> from samref_jax.host import tune_malloc
>>> applied = tune_malloc()  # True on glibc (Linux) unless SAMREF_DEFAULT_MALLOC=1
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["malloc_setting", "tune_malloc"]

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's largest accepted value on 64-bit
    (_M_TRIM_THRESHOLD, 1 << 30),
    (_M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB beyond each request
)
SINGLE_ARENA_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main arena (grown by brk)
    (_M_MMAP_MAX, 0),  # no block gets pages of its own
    (_M_TRIM_THRESHOLD, -1),  # -1: never give the heap's top back to the kernel
)

_applied: dict[str, bool] = {}


def _env(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def tune_malloc(single_arena: bool | None = None) -> bool:
    """Applies :data:`SETTINGS` once per process, and :data:`SINGLE_ARENA_SETTINGS` once when
    ``single_arena`` (None: the environment's ``SAMREF_SINGLE_ARENA=1``); returns whether the
    base settings are in effect.

    Called by the predictors, the CLI, the evaluator and the trainer. A no-op returning False
    where the C library has no glibc ``mallopt`` (macOS, Windows, musl) or when the environment
    sets ``SAMREF_DEFAULT_MALLOC=1``.
    """
    if "base" not in _applied:
        _applied["base"] = _mallopt(SETTINGS)
    single = _env("SAMREF_SINGLE_ARENA") if single_arena is None else single_arena
    if single and _applied["base"] and "single_arena" not in _applied:
        _applied["single_arena"] = _mallopt(SINGLE_ARENA_SETTINGS)
    return _applied["base"]


def malloc_setting() -> str:
    """What :func:`tune_malloc` has put in effect: ``"default"`` (glibc's own: not called, not
    glibc, or ``SAMREF_DEFAULT_MALLOC=1``), ``"tuned"`` or ``"single-arena"``."""
    if not _applied.get("base"):
        return "default"
    return "single-arena" if _applied.get("single_arena") else "tuned"


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    if _env("SAMREF_DEFAULT_MALLOC"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
        mallopt = libc.mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in settings)
