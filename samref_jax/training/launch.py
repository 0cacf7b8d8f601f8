"""Starts N local processes of a JAX program joined by ``jax.distributed`` (CPU devices, gloo).

What a TPU pod does with one process per host, on one machine: every process gets
``XLA_FLAGS=--xla_force_host_platform_device_count=M`` (M CPU devices each), ``JAX_PLATFORMS=cpu``
and the standard ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1:<free port>), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``, which ``train.main`` reads (``samref_jax.training.distributed``). The
launcher prefixes each process's output with ``[pI]``, waits for all of them, and when one fails
stops the others and returns its exit status (124 when ``timeout_s`` passes).

    python train/launch_local.py --num_processes 2 --devices_per_process 4 -- \\
        --config configs/tiny_cpu.py --workdir runs/mp --config.train.num_steps=20

Example:
  >>> launch(["--config", "configs/tiny_cpu.py", "--workdir", "runs/mp"], 2, 4)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from samref_jax.training.preemption import PREEMPTED_EXIT_STATUS

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def process_env(
    process_id: int,
    num_processes: int,
    coordinator: str,
    devices_per_process: int,
    platform: str | None = "cpu",
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process ``process_id`` (``XLA_FLAGS`` device count replaced)."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (
        f"{flags.strip()} --xla_force_host_platform_device_count={int(devices_per_process)}"
    ).strip()
    if platform:
        env["JAX_PLATFORMS"] = platform
    env["JAX_COORDINATOR_ADDRESS"] = coordinator
    env["JAX_NUM_PROCESSES"] = str(int(num_processes))
    env["JAX_PROCESS_ID"] = str(int(process_id))
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _pump(stream, prefix: str, sink, lines: list[str] | None) -> None:
    for line in iter(stream.readline, ""):
        if lines is not None:
            lines.append(line)
        sink.write(prefix + line)
        sink.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM to every live process group, then SIGKILL after ``grace_s`` (JAX's preemption
    notifier catches SIGTERM in a distributed process)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in procs if p.poll() is None]
        if not live:
            return
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in live):
            time.sleep(0.05)


def launch(
    args: Sequence[str],
    num_processes: int = 2,
    devices_per_process: int = 4,
    *,
    module: str = "train.main",
    coordinator: str | None = None,
    platform: str | None = "cpu",
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    output=None,
    capture: list[str] | None = None,
) -> int:
    """Runs ``python -m module *args`` as ``num_processes`` processes; returns the exit status
    (0 when all succeed; 143 when they stopped on a preemption notice, checkpointed; else the
    first failure's, a negative number for a signal; 124 on timeout). ``capture``, when given,
    receives every output line (prefixed)."""
    coordinator = coordinator or f"127.0.0.1:{free_port()}"
    sink = sys.stdout if output is None else output
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    lines: list[str] | None = [] if capture is not None else None
    try:
        for i in range(int(num_processes)):
            p = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=process_env(i, num_processes, coordinator, devices_per_process, platform, env),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,  # its own process group: stopped with its children
            )
            procs.append(p)
            t = threading.Thread(
                target=_pump, args=(p.stdout, f"[p{i}] ", sink, lines), daemon=True
            )
            t.start()
            threads.append(t)
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        status = 0
        orderly = (0, PREEMPTED_EXIT_STATUS)  # a preempted process stopped with the others
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c is not None and c not in orderly]
            if failed:
                status = failed[0]
                break
            if all(c in orderly for c in codes):
                status = max(codes)
                break
            if deadline is not None and time.monotonic() > deadline:
                sink.write(f"launch: timeout after {timeout_s} s, stopping all processes\n")
                status = 124
                break
            time.sleep(0.05)
        if status != 0:
            _stop(procs)
        for t in threads:
            t.join(timeout=5)
        return status
    finally:
        _stop(procs, grace_s=2.0)
        if capture is not None and lines is not None:
            capture.extend(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``samref launch-local`` (also ``python train/launch_local.py``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, rest = argv[:k], argv[k + 1 :]
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Start N local processes of the training entry point (jax.distributed, "
        "CPU devices, gloo collectives); arguments after -- go to each process.",
        epilog="example:\n"
        "  samref launch-local --num_processes 2 --devices_per_process 4 -- \\\n"
        "      --config configs/tiny_cpu.py --workdir runs/mp --config.train.num_steps=20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--num_processes", type=int, default=int(os.environ.get("JAX_NUM_PROCESSES", 2))
    )
    ap.add_argument(
        "--devices_per_process", type=int, default=4, help="CPU devices of each process (XLA_FLAGS)"
    )
    ap.add_argument(
        "--coordinator", default=None, help="HOST:PORT (default 127.0.0.1 and a free port)"
    )
    ap.add_argument("--module", default="train.main", help="python -m MODULE for each process")
    ap.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the processes ('' keeps)")
    ap.add_argument("--timeout", type=float, default=None, help="stop all after this many s")
    a = ap.parse_args(argv)
    # Stopped ourselves: stop the processes too (launch's cleanup runs on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    status = launch(
        rest,
        a.num_processes,
        a.devices_per_process,
        module=a.module,
        coordinator=a.coordinator,
        platform=a.platform or None,
        timeout_s=a.timeout,
    )
    if status != 0:
        print(f"launch: a process failed (status {status})", file=sys.stderr)
    return 0 if status == 0 else (status if status > 0 else 128 - status)


if __name__ == "__main__":
    raise SystemExit(main())
