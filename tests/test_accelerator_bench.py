"""``benchmarks/accelerator.py --smoke`` runs on the CPU with tiny sizes and prints its tables
(the full vit_b run needs an accelerator and is not a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_peak_table_lookup():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from accelerator import PEAK_FLOPS, peak_key
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    cases = {
        "NVIDIA H100 80GB HBM3": "NVIDIA H100 SXM",
        "NVIDIA H100 PCIe": "NVIDIA H100 PCIe",
        "NVIDIA H200": "NVIDIA H200",
        "NVIDIA A100-SXM4-80GB": "NVIDIA A100",
        "NVIDIA L4": "NVIDIA L4",
        "NVIDIA L40S": None,
        "TPU v4": "TPU v4",
        "TPU v5 lite": "TPU v5e",
        "TPU v5p": "TPU v5p",
        "TPU v6 lite": "TPU v6e",
        "cpu": None,
    }
    for kind, want in cases.items():
        assert peak_key(kind) == want, kind
        assert want is None or PEAK_FLOPS[want] > 1e14


@pytest.mark.slow
def test_accelerator_benchmark_smoke_on_cpu():
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for needle in (
        "image encoder",
        "float32",
        "bfloat16",
        "mode sam",
        "mode full",
        "images/s",
        "clicks/s",
        "MFU",
        "TPU v5p",
        "NVIDIA H100 SXM",
    ):
        assert needle in out, (needle, out[-3000:])
