"""Multi-process set-up: ``jax.distributed.initialize`` with a bounded, explained failure.

Several processes (hosts of a TPU pod, or N local CPU processes in tests; docs/design.md,
'Multi-process training') run the same program; each calls :func:`initialize` before its first
JAX computation. Arguments come from flags or from the standard environment variables::

    JAX_COORDINATOR_ADDRESS   host:port of process 0's coordination service
    JAX_NUM_PROCESSES         number of processes
    JAX_PROCESS_ID            this process's id (0 .. N-1)

On the CPU backend the cross-process collectives are gloo's (set here, before the backend
starts). ``jax.distributed.initialize`` itself aborts the process (SIGABRT, with a message
about "another task" having died) when the coordinator cannot be reached within its timeout;
:func:`initialize` first probes the coordinator's TCP port for at most ``timeout_s`` and raises
:class:`CoordinatorUnreachableError` with a plain message instead, and prints an explanation
before JAX's own deadline when the other processes do not join. :func:`exit_alone_on_error`
ends a process that fails on its own at once, rather than after JAX's shutdown barrier.

Example:
  >>> initialize("127.0.0.1:12345", num_processes=2, process_id=1, timeout_s=60)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class CoordinatorUnreachableError(RuntimeError):
    """The coordinator (process 0) could not be reached within the timeout."""


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[str | None, int | None, int | None]:
    """Flags first, then ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``."""
    env = os.environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    return coordinator, num_processes, process_id


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def wait_for_port(address: str, timeout_s: float, interval_s: float = 0.2) -> bool:
    """True as soon as a TCP connection to ``address`` succeeds; False after ``timeout_s``."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(interval_s, 0.5)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval_s)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: float = 300.0,
    cpu_collectives: str = "gloo",
) -> bool:
    """Joins this process to the others; returns False (and does nothing) for one process.

    Raises :class:`CoordinatorUnreachableError` (within about ``timeout_s``) when a process
    other than 0 cannot connect to the coordinator, and ``ValueError`` on missing arguments.
    """
    coordinator, num_processes, process_id = resolve(coordinator, num_processes, process_id)
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError(
            "multi-process training needs the coordinator address, the number of processes and "
            f"this process's id (flags or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
            f"${ENV_PROCESS_ID}); got {coordinator!r}, {num_processes!r}, {process_id!r}"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} not in [0, {num_processes})")
    import jax

    if cpu_collectives:  # only used by the CPU backend; must be set before it starts
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    timeout_s = max(float(timeout_s), 1.0)
    t0 = time.monotonic()
    if process_id != 0 and not wait_for_port(coordinator, timeout_s):
        raise CoordinatorUnreachableError(
            f"process {process_id} of {num_processes} could not reach the JAX coordinator at "
            f"{coordinator} within {timeout_s:.0f} s: is process 0 running, and are the address "
            "and port right (and not blocked by a firewall)?"
        )
    remaining = max(timeout_s - (time.monotonic() - t0), 1.0)
    # JAX aborts the process when not every process registers in time; say why first.
    done = threading.Event()

    def warn() -> None:
        if not done.wait(max(remaining - 0.5, 0.1)):
            print(
                f"error: process {process_id}: not all {num_processes} processes joined the JAX "
                f"coordinator at {coordinator} within {timeout_s:.0f} s (are the others running "
                "with the same address and process count?); JAX will abort this process",
                file=sys.stderr,
                flush=True,
            )

    threading.Thread(target=warn, daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes=int(num_processes),
            process_id=int(process_id),
            initialization_timeout=int(max(remaining, 1)),
        )
    finally:
        done.set()
    return True


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


_BARRIERS: dict[str, int] = {}


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """All processes wait here (no-op for one process). The coordination service's barrier:
    no device computation, so it also waits for a process that is still compiling (gloo's
    collectives give up after a while)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as _dist

    n = _BARRIERS[name] = _BARRIERS.get(name, -1) + 1  # barrier ids must be unique
    client = _dist.global_state.client
    if client is None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"{name}_{n}")
    else:
        client.wait_at_barrier(f"samref_{name}_{n}", int(timeout_s * 1000))


def define_flags(flag_values: Any) -> None:
    """The multi-process flags of the command-line tools (``train/main.py``, ``samref
    cache-embeddings``) on an absl ``FlagValues``: --distributed, --coordinator,
    --num_processes, --process_id, --init_timeout (read by :func:`start_from_flags`)."""
    from absl import flags

    fv = flag_values
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize()", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "multi-process coordinator HOST:PORT", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's id", flag_values=fv)
    flags.DEFINE_float(
        "init_timeout", 300.0, "seconds to wait for the other processes", flag_values=fv
    )


def start_from_flags(flag_values: Any) -> int:
    """Joins the other processes as the flags of :func:`define_flags` (or the ``JAX_*``
    variables) say, before the first JAX computation; returns 0, or 3 after one error line on
    stderr when the coordinator is unreachable or the arguments are incomplete.

    Coordinator, process count or id given: :func:`initialize` (bounded, explained failure);
    otherwise ``--distributed``: ``jax.distributed.initialize()`` finds them itself (TPU pods);
    otherwise one process, nothing to do.
    """
    fv = flag_values
    coordinator, num_processes, process_id = resolve(
        fv.coordinator, fv.num_processes, fv.process_id
    )
    if coordinator or num_processes is not None or process_id is not None:
        try:
            initialize(coordinator, num_processes, process_id, timeout_s=fv.init_timeout)
        except (CoordinatorUnreachableError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 3
    elif fv.distributed:
        import jax

        jax.distributed.initialize(initialization_timeout=int(fv.init_timeout))
    return 0


@contextlib.contextmanager
def exit_alone_on_error(
    alike: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """With several processes, an exception raised inside ends this process at once: its
    traceback on stderr, then exit status 1 (``os._exit``). Left to Python, the process would
    wait at JAX's shutdown barrier (300 s) for peers that wait for it in a collective, and then
    every process would abort with "Shutdown barrier has failed"; exiting at once lets the
    launcher (``samref launch-local``) or a scheduler end the job, and JAX's heartbeat (100 s)
    ends the peers otherwise. Exceptions of the ``alike`` types (raised by every process alike,
    e.g. a refused config) and any exception in one process propagate as usual."""
    try:
        yield
    except Exception as e:
        import jax

        if jax.process_count() == 1 or isinstance(e, alike):
            raise
        print(f"process {jax.process_index()} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
