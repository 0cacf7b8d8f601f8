"""Run a test script in a fresh Python process, where it can fake several CPU devices.

The device count (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) must be set before
jax is imported, so scripts that need several devices run in their own process; they set the
flag themselves and print ``OK`` when their checks pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, timeout: int = 900) -> str:
    """Runs ``script`` with the repository importable and no inherited ``XLA_FLAGS``; asserts
    that it exits 0 and printed ``OK``; returns its stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK" in r.stdout, r.stdout[-3000:]
    return r.stdout
