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
import resource
import numpy as np
from samref_jax.host import tune_malloc
applied = tune_malloc()
def churn():  # a working set of 12 MB scratch blocks, allocated, touched and freed, repeatedly
    for _ in range(10):
        blocks = [np.ones(3 << 20, np.float32) for _ in range(8)]
        del blocks
churn()  # warm-up: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_extra: dict) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "SAMREF_DEFAULT_MALLOC"}
    env.update(PYTHONPATH=str(REPO), **env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
@pytest.mark.slow
def test_tuned_malloc_keeps_scratch_pages():
    assert tune_malloc() is True and tune_malloc() is True  # idempotent
    tuned, tuned_faults = _faults({})
    default, default_faults = _faults({"SAMREF_DEFAULT_MALLOC": "1"})
    assert tuned and not default
    # glibc's defaults hand the freed blocks back to the kernel and fault them in again
    # (about 40k faults here); tuned, they stay in the heap.
    assert tuned_faults * 10 < default_faults, (tuned_faults, default_faults)
