"""``python -m samref_jax.evaluate``: ``samref eval`` (``samref-eval``), the same function."""

from samref_jax.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
