"""samref_jax.host: glibc malloc settings for XLA:CPU (fewer page faults, same numbers)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from samref_jax.host import tune_malloc

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = """
import ctypes, resource, threading
import numpy as np
from samref_jax.host import malloc_setting, tune_malloc
applied = tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def churn():  # a working set of 12 MB scratch blocks, allocated, touched and freed, repeatedly
    for _ in range(10):
        blocks = [np.ones(3 << 20, np.float32) for _ in range(8)]
        del blocks
def big():  # a 96 MB block (an executable's temporary buffer), allocated, written, freed
    for _ in range(5):  # (plain malloc: numpy asks for huge pages, XLA does not)
        block = libc.malloc(96 << 20)
        ctypes.memset(block, 1, 96 << 20)
        libc.free(block)
def faults(fn):  # page faults of fn run in a new thread (as XLA:CPU's workers run programs)
    worker = threading.Thread(target=fn)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker.start()
    worker.join()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
churn()  # warm-up: the heap grows once
big()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, faults(big),
      malloc_setting())
"""


def _faults(env_extra: dict) -> tuple[bool, int, int, str]:
    drop = ("SAMREF_DEFAULT_MALLOC", "SAMREF_SINGLE_ARENA")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(REPO), **env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2]), out[3]


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
@pytest.mark.slow
def test_tuned_malloc_keeps_scratch_pages():
    assert tune_malloc() is True and tune_malloc() is True  # idempotent
    tuned, tuned_small, tuned_big, tuned_name = _faults({})
    default, default_small, default_big, default_name = _faults({"SAMREF_DEFAULT_MALLOC": "1"})
    single, single_small, single_big, single_name = _faults({"SAMREF_SINGLE_ARENA": "1"})
    assert tuned and single and not default
    assert (tuned_name, single_name, default_name) == ("tuned", "single-arena", "default")
    # glibc's defaults hand the freed small blocks back to the kernel and fault them in again
    # (about 40k faults); tuned, they stay in the heap.
    assert tuned_small * 10 < default_small, (tuned_small, default_small)
    assert single_small * 10 < default_small, (single_small, default_small)
    # A block above glibc's largest mmap threshold (32 MiB), allocated by a thread, is mapped
    # and faulted in on every call (5 x 24.6k faults) unless the single-arena setting is on.
    assert tuned_big * 2 > default_big, (tuned_big, default_big)
    assert single_big * 10 < default_big, (single_big, default_big)
