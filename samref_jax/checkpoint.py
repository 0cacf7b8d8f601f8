"""Model checkpoints on disk: an orbax PyTree under `DIR/params` plus `DIR/metadata.json`.

The parameter tree is `{"sam": <SAM params>}` for converted SAM weights, and additionally
`{"global_diff": ..., "patch_diff": ...}` for SAM-REF checkpoints. `metadata.json` records the
model type, the SAM config, where the weights came from and (for SAM-REF) the refiner config.
Everything is written to a hidden sibling directory that is renamed into place when complete,
so a killed write never leaves a half-written checkpoint and keeps the previous one intact.

Example:
  >>> save_model_checkpoint("/tmp/ckpt", {"sam": params}, {"model_type": "tiny"})  # doctest: +SKIP
  >>> tree, meta = load_model_checkpoint("/tmp/ckpt")                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath

from samref_jax.paths import as_path, is_local

FORMAT = "samref-jax-checkpoint"
FORMAT_VERSION = 1
_PARAMS = "params"
_META = "metadata.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or not ours. The message says which."""


def _is_checkpoint(directory: Path | epath.Path) -> bool:
    try:
        return json.loads((directory / _META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_directory(directory: str | os.PathLike, overwrite: bool = False) -> epath.Path:
    """Raises `CheckpointError` unless `directory` may receive a checkpoint.

    A missing or empty directory is fine; an existing checkpoint only with `overwrite`
    (``--force`` on the command line); a file, or a non-empty directory that is not a
    checkpoint, never (replacing it would delete files that are not ours).
    """
    directory = as_path(directory, absolute=True)  # gs://... kept verbatim
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"output {str(directory)!r} exists and is not a directory")
    if not directory.is_dir() or not any(directory.iterdir()):
        return directory
    if not _is_checkpoint(directory):
        raise CheckpointError(
            f"output directory {str(directory)!r} is not empty and holds no samref-jax "
            "checkpoint: refusing to replace it (choose a new or empty directory)"
        )
    if not overwrite:
        raise CheckpointError(
            f"output directory {str(directory)!r} already holds a checkpoint "
            "(pass --force to replace it)"
        )
    return directory


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _move_into_place(staging: Path, directory: Path) -> None:
    """Renames the finished `staging` directory to `directory`, replacing what is there."""
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        os.replace(staging, directory)  # atomic; replaces an empty directory
        return
    if _exchange(staging, directory):  # one atomic step: `staging` now holds the old one
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def save_model_checkpoint(
    directory: str | os.PathLike,
    tree: dict[str, Any],
    metadata: dict[str, Any],
    *,
    overwrite: bool = True,
) -> epath.Path:
    """Writes `tree` (dict of param pytrees) and `metadata` to `directory`.

    Everything is written to a hidden sibling directory first, which is then renamed into
    place: a kill during the save leaves the previous checkpoint (if any) intact. An existing
    checkpoint is replaced only with `overwrite`; a non-empty directory that is not a
    checkpoint is never replaced (`check_output_directory`).

    With several JAX processes every one of them must call this (orbax's save is collective).

    On an object store (``gs://...``: no directory rename) the parameters are written in place,
    after removing the checkpoint being replaced, and ``metadata.json`` last: an interrupted
    save leaves a directory that :func:`read_metadata` refuses, not a mixed checkpoint.
    """
    import orbax.checkpoint as ocp

    directory = check_output_directory(directory, overwrite)
    tree = jax.tree_util.tree_map(np.asarray, tree)
    directory.parent.mkdir(parents=True, exist_ok=True)
    local = is_local(directory)
    staging = directory.with_name(f".{directory.name}.partial") if local else directory
    main = jax.process_index() == 0
    if main and not local:  # the replaced checkpoint stops being one before any byte changes
        (directory / _META).unlink(missing_ok=True)
    if main and jax.process_count() == 1:
        staging.rmtree(missing_ok=True)  # left by a killed save, or replaced (object store)
    staging.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(staging / _PARAMS, tree, force=True)
    ckptr.wait_until_finished()
    if main:  # several processes: all save (orbax), process 0 writes this and renames
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
        (staging / _META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if local:
            _move_into_place(staging, directory)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates `metadata.json` of a checkpoint directory."""
    directory = as_path(directory)
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

    directory = as_path(directory, absolute=True)
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
