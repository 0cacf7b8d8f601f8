"""``python -m train.main --config configs/tiny_cpu.py --workdir runs/x [--config.a.b=v ...]``
(also the ``samref-train`` console script).

``--config`` is an ml_collections config file (``get_config()``); any field can be overridden
with ``--config.<path>=<value>``. An existing ``--workdir`` resumes. Multi-host: pass
``--coordinator HOST:PORT --num_processes N --process_id I`` (or nothing on TPU pods, where
``jax.distributed.initialize()`` finds them itself with ``--distributed``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file", flag_values=fv,
                                    lock_config=False)
    flags.DEFINE_string("workdir", None, "run directory (resumed if it exists)", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize()", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "multi-process coordinator HOST:PORT", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's id", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    fv(["samref-train", *argv])
    if fv.config is None or fv.workdir is None:
        print("usage: samref-train --config configs/X.py --workdir DIR [--config.a.b=v]",
              file=sys.stderr)
        return 2
    import jax

    if fv.coordinator or fv.distributed:
        jax.distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
    from samref_jax.training.trainer import train

    summary = train(fv.config, fv.workdir, progress=fv.progress,
                    command="python -m train.main " + " ".join(argv))
    print({k: v for k, v in summary.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
