"""Model checkpoints on disk: an orbax PyTree under `DIR/params` plus `DIR/metadata.json`.

The parameter tree is `{"sam": <SAM params>}` for converted SAM weights, and additionally
`{"global_diff": ..., "patch_diff": ...}` for SAM-REF checkpoints. `metadata.json` records the
model type, the SAM config, where the weights came from and (for SAM-REF) the refiner config.
Orbax writes to a temporary directory and renames it when complete, so a killed write never
leaves a checkpoint that loads half-written.

Example:
  >>> save_model_checkpoint("/tmp/ckpt", {"sam": params}, {"model_type": "tiny"})  # doctest: +SKIP
  >>> tree, meta = load_model_checkpoint("/tmp/ckpt")                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

FORMAT = "samref-jax-checkpoint"
FORMAT_VERSION = 1
_PARAMS = "params"
_META = "metadata.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or not ours. The message says which."""


def save_model_checkpoint(
    directory: str | os.PathLike, tree: dict[str, Any], metadata: dict[str, Any]
) -> Path:
    """Writes `tree` (dict of param pytrees) and `metadata` to `directory`. Overwrites.

    With several JAX processes every one of them must call this (orbax's save is collective).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    tree = jax.tree_util.tree_map(np.asarray, tree)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory / _PARAMS, tree, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:  # several processes: all save (orbax), process 0 writes this
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
        tmp = directory / (_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, directory / _META)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates `metadata.json` of a checkpoint directory."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    meta_path = directory / _META
    if not meta_path.is_file():
        raise CheckpointError(
            f"{str(directory)!r} is not a samref-jax checkpoint (no {_META}); convert official "
            "SAM weights with convert_weights.py first"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} does not describe a {FORMAT}")
    return meta


def load_model_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (tree of NumPy arrays, metadata). Raises `CheckpointError` with a clear message."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = read_metadata(directory)
    params_dir = directory / _PARAMS
    if not params_dir.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {_PARAMS}/ directory")
    try:
        tree = ocp.StandardCheckpointer().restore(params_dir)
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(
            f"could not read parameters from {str(params_dir)!r} (damaged or incomplete): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return jax.tree_util.tree_map(np.asarray, tree), meta
