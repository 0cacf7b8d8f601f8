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


def run_python(args: list[str], timeout: int = 900, env: dict[str, str] | None = None) -> str:
    """Runs ``python ARGS`` in the repository with it importable, no inherited ``XLA_FLAGS``
    and ``env`` added; asserts that it exits 0; returns its stdout."""
    full = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full.pop("XLA_FLAGS", None)
    full.update(env or {})
    r = subprocess.run(
        [sys.executable, *args],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def run_script(script: str, timeout: int = 900, args: tuple[str, ...] = ()) -> str:
    """Runs ``python -c script ARGS`` (:func:`run_python`); asserts that it printed ``OK``;
    returns its stdout."""
    out = run_python(["-c", script, *args], timeout)
    assert "OK" in out, out[-3000:]
    return out
