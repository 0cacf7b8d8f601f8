"""Shared helpers for the benchmark scripts (timing, tables, the official torch model)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def median_time(fn: Callable[[], object], runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time (s) of `fn()` over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def device_median(fn: Callable[[], object], runs: int, warmup: int = 1) -> tuple[float, object]:
    """(median wall time in s of ``runs`` calls of ``fn()``, the first call's output), each call
    waited for with ``jax.block_until_ready``, after ``warmup`` (>= 1) untimed calls; with
    ``runs == 0`` the last warm-up call's time (compiled beforehand: no compile in it)."""
    import jax

    out, times = None, []
    for i in range(max(warmup, 1)):
        t = time.perf_counter()
        res = jax.block_until_ready(fn())
        times = [time.perf_counter() - t]
        out = res if i == 0 else out
    if runs > 0:
        times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def fmt_flops(x: float) -> str:
    """FLOPs with a unit."""
    for unit, v in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= v:
            return f"{x / v:.2f} {unit}"
    return f"{x:.0f} FLOP"


def fmt_bytes(n: float) -> str:
    """Bytes as GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_time(s: float) -> str:
    """Seconds as "12.3 ms" below 10 s, else "12.34 s"."""
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def host_setup(default_malloc: bool = False, single_arena: bool = False) -> bool:
    """The process settings our predictors use (samref_jax.host.tune_malloc), applied up front
    so that both sides of a comparison run under them; `default_malloc` keeps glibc's,
    `single_arena` adds the single-arena setting (docs/design.md, 'Host malloc')."""
    if default_malloc:
        os.environ["SAMREF_DEFAULT_MALLOC"] = "1"
    elif single_arena:
        os.environ["SAMREF_SINGLE_ARENA"] = "1"  # also for the processes it starts
    from samref_jax.host import tune_malloc

    return tune_malloc()


def machine_line() -> str:
    import jax

    from samref_jax.host import malloc_setting, tune_malloc

    tune_malloc()  # as the predictors would (a no-op after host_setup)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"cpus={os.cpu_count()} load1={load:.2f} jax={jax.__version__} "
        f"malloc={malloc_setting()}"
    )


def official_sam(model_type: str, seed: int = 0):
    """The official torch SAM of `model_type` with random weights (no checkpoint needed)."""
    from samref_jax.sam.config import sam_config
    from tests.sam_reference import random_torch_sam

    return random_torch_sam(sam_config(model_type), seed=seed)
