"""Loading a predictor by checkpoint directory or bundled name, with one-line errors.

Shared by the ``samref`` command line (:mod:`samref_jax.cli`) and the browser demo
(:mod:`samref_jax.demo.app`); JAX is imported only once the checks pass.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BUNDLED_NAMES",
    "DTYPES",
    "LoadError",
    "check_checkpoint",
    "load_predictor",
    "short_reason",
]

BUNDLED_NAMES = ("tiny", "tiny-sam")
# Compute dtypes of the predictor (`--dtype`): parameters stay float32 either way.
DTYPES = ("float32", "bfloat16")


class LoadError(Exception):
    """A checkpoint that is missing or cannot be loaded: a one-line message for the user."""


def short_reason(e: BaseException) -> str:
    """The last line of an exception's message (the reason, without a repeated path)."""
    text = str(e).strip().splitlines()
    text = text[-1] if text else type(e).__name__
    # DataError repeats the path; keep the reason only.
    return text.split(": ", 1)[-1] if text.startswith("cannot decode") else text


def check_checkpoint(name_or_path: str) -> None:
    """Fail early (before importing JAX) when a checkpoint directory or bundled name is missing."""
    if name_or_path in BUNDLED_NAMES:
        from samref_jax.checkpoint import CheckpointError
        from samref_jax.samref.io import resolve_checkpoint

        try:
            resolve_checkpoint(name_or_path)
        except CheckpointError as e:
            raise LoadError(
                f"{e} (train it, or pass a checkpoint directory with --checkpoint DIR)"
            ) from None
        return
    p = Path(name_or_path)
    if not p.exists():
        raise LoadError(
            f"checkpoint not found: {p} (give a checkpoint directory or a bundled name: "
            f"{', '.join(BUNDLED_NAMES)})"
        )
    if not p.is_dir():
        raise LoadError(f"checkpoint is not a directory: {p}")


def load_predictor(name_or_path: str, mode: str = "full", dtype: str = "float32"):
    """``SamRefPredictor.from_checkpoint`` with checkpoint errors turned into :class:`LoadError`.

    ``dtype``: the compute dtype, one of :data:`DTYPES` (parameters stay float32).
    """
    if dtype not in DTYPES:
        raise LoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_checkpoint(name_or_path)
    import jax.numpy as jnp

    from samref_jax.checkpoint import CheckpointError
    from samref_jax.samref.predictor import SamRefPredictor

    try:
        return SamRefPredictor.from_checkpoint(name_or_path, mode=mode, dtype=jnp.dtype(dtype))
    except CheckpointError as e:
        raise LoadError(f"cannot load checkpoint {name_or_path}: {short_reason(e)}") from None
