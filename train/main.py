"""``samref train --config configs/tiny_cpu.py --workdir runs/x [--config.a.b=v ...]`` (also
``python -m train.main`` and the ``samref-train`` console script).

``--config`` is an ml_collections config file (``get_config()``); any field can be overridden
with ``--config.<path>=<value>``. An existing ``--workdir`` resumes. Multi-host: pass
``--coordinator HOST:PORT --num_processes N --process_id I`` (or set ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; or nothing on TPU pods, where
``jax.distributed.initialize()`` finds them itself with ``--distributed``). A process that cannot
reach the coordinator within ``--init_timeout`` seconds exits with status 3 and a message.
On a scheduler's preemption notice (SIGTERM to any process) every process checkpoints one agreed
step and exits with status 143 (128 + SIGTERM) without the final evaluation and export; the
same command resumes from that step. A process that fails alone (an exception on one host)
prints its traceback and exits with status 1 at once instead of waiting for the others.
``train/launch_local.py`` starts N such processes on this machine (CPU devices, gloo).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "--config configs/X.py --workdir DIR [--config.a.b=v ...] [flags]"
DESCRIPTION = (
    "Train SAM-REF: one jit-compiled, data-parallel step unrolls the click rounds end to end;\n"
    "an existing --workdir resumes. Any config field can be overridden with --config.a.b=v.\n"
    "Recipes and outputs: docs/training.md."
)
EXAMPLE = "samref train --config configs/tiny_cpu.py --workdir runs/tiny --config.mode=sam"


def main(argv: Sequence[str] | None = None, prog: str = "samref-train") -> int:
    from absl import flags
    from ml_collections import config_flags

    from samref_jax.host import tune_malloc
    from samref_jax.training import distributed
    from samref_jax.training.flag_args import parse_flags

    tune_malloc()  # before JAX starts its threads (samref_jax/host.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "training config file", flag_values=fv, lock_config=False
    )
    flags.DEFINE_string("workdir", None, "run directory (resumed if it exists)", flag_values=fv)
    distributed.define_flags(fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    flags.DEFINE_bool("print_config", False, "print the resolved config and exit", flag_values=fv)
    flags.DEFINE_bool(
        "allow_config_change",
        False,
        "resume even if the config differs from WORKDIR/config.json in keys that change the "
        "model or the data",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "kill_after_step",
        None,
        "tests: SIGKILL this process right after the checkpoint of this step is written (a crash)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "preempt_after_step",
        None,
        "tests: send the last process SIGTERM after this step (a scheduler's preemption notice)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "fail_after_step",
        None,
        "tests: raise an error in the last process alone after this step (a host's failure)",
        flag_values=fv,
    )
    status = parse_flags(fv, argv, prog, USAGE, DESCRIPTION, EXAMPLE)
    if status is not None:
        return status
    if fv.print_config and fv.config is not None:
        print(fv.config)
        return 0
    if fv.config is None or fv.workdir is None:
        print(f"usage: {prog} {USAGE} (see --help)", file=sys.stderr)
        return 2
    from samref_jax.training.trainer import TrainConfigError, check_config

    try:  # before connecting to other processes, creating the workdir or tracing anything
        check_config(fv.config)
    except TrainConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    import jax

    status = distributed.start_from_flags(fv)
    if status:
        return status
    from samref_jax.training.checkpointing import TrainCheckpointError
    from samref_jax.training.trainer import train

    try:
        # One process failing alone ends the run at once; refusals every process meets alike
        # end each with one line and status 2.
        with distributed.exit_alone_on_error(alike=(TrainConfigError, TrainCheckpointError)):
            summary = train(
                fv.config,
                fv.workdir,
                progress=fv.progress,
                command="python -m train.main " + " ".join(argv),
                kill_after_step=fv.kill_after_step,
                preempt_after_step=fv.preempt_after_step,
                fail_after_step=fv.fail_after_step,
                allow_config_change=fv.allow_config_change,
            )
    except (TrainConfigError, TrainCheckpointError) as e:  # raised by every process alike
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if jax.process_index() == 0:
        print({k: v for k, v in summary.items()})
    if summary["stop_reason"] == "preempted":  # checkpointed; a scheduler reruns the command
        from samref_jax.training.preemption import PREEMPTED_EXIT_STATUS

        return PREEMPTED_EXIT_STATUS
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
