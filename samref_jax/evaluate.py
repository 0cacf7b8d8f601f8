"""``python -m samref_jax.evaluate``: the ``samref-eval`` command."""

from samref_jax.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
