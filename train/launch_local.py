"""Start N local processes of ``train.main`` joined by ``jax.distributed`` (see
``samref_jax.training.launch``)::

    python train/launch_local.py --num_processes 2 --devices_per_process 4 -- \\
        --config configs/tiny_cpu.py --workdir runs/mp --config.train.num_steps=20
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from samref_jax.training.launch import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
