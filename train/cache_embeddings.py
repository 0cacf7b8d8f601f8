"""``python -m train.cache_embeddings --config configs/X.py [--workdir DIR] [--config.a.b=v]``:
the embedding cache for training with a frozen encoder
(``samref_jax.training.cache_embeddings``; the same flags as ``train.main``)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from samref_jax.training.cache_embeddings import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
