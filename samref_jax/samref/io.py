"""SAM-REF checkpoints: save/load {"sam", "global_diff", "patch_diff"} plus the model config.

`resolve_checkpoint` also accepts the bundled model names `tiny` (SAM-REF) and `tiny-sam`
(the SAM-only baseline trained with the same budget), shipped inside the package.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from samref_jax.checkpoint import CheckpointError, load_model_checkpoint, save_model_checkpoint
from samref_jax.paths import as_path
from samref_jax.sam.build import config_from_metadata
from samref_jax.sam.config import sam_config
from samref_jax.samref.config import from_jsonable, sam_config_from, samref_model_config
from samref_jax.samref.model import init_samref_params

BUNDLED = {"tiny": "tiny", "tiny-sam": "tiny-sam"}
_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "checkpoints"


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A bundled model name (`tiny`, `tiny-sam`) or a directory -> the checkpoint directory."""
    key = str(name_or_path)
    if key in BUNDLED:
        path = _ASSETS / BUNDLED[key]
        if not path.is_dir():
            raise CheckpointError(f"bundled checkpoint {key!r} is missing from the package")
        return path
    return as_path(name_or_path)  # epath: gs://... kept verbatim


def untrained_refiners(meta: dict[str, Any]) -> bool:
    """True when a checkpoint's refiners were never trained: it was trained in 'sam' mode (the
    bundled ``tiny-sam``; ``metadata.json`` ``training.mode``), where the refiners are frozen at
    their initial values. SAM-only checkpoints get a warning from :func:`load_samref` instead."""
    training = meta.get("training") or {}
    mode = training.get("mode") or (training.get("config") or {}).get("mode")
    return mode == "sam"


def save_samref(
    directory: str | os.PathLike,
    params: dict[str, Any],
    config: ml_collections.ConfigDict,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Writes SAM-REF params and config (orbax + metadata.json)."""
    sc = sam_config_from(config)
    meta = {
        "model_type": config.sam_type,
        "sam_config": dataclasses.asdict(sc),
        "samref_config": config.to_dict(),
        **(extra_metadata or {}),
    }
    return save_model_checkpoint(directory, dict(params), meta)


def load_samref(
    name_or_path: str | os.PathLike, rng: jax.Array | None = None
) -> tuple[dict[str, Any], ml_collections.ConfigDict, dict[str, Any]]:
    """Loads (params, model config, metadata). SAM-only checkpoints (from convert_weights.py)
    get freshly initialised refiners, with a warning."""
    path = resolve_checkpoint(name_or_path)
    tree, meta = load_model_checkpoint(path)
    if "sam" not in tree:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no SAM parameters")
    if "samref_config" in meta:
        config = from_jsonable(meta["samref_config"])
    else:
        sc = config_from_metadata(meta)
        base = meta.get("model_type", sc.name)
        base = base if base in ("vit_b", "vit_l", "vit_h", "tiny") else "tiny"
        config = samref_model_config(base)
        default = sam_config(base)
        config.sam_overrides = {
            k: v for k, v in dataclasses.asdict(sc).items() if getattr(default, k) != v
        }
    params = jax.tree_util.tree_map(jnp.asarray, tree)
    missing = [k for k in ("global_diff", "patch_diff") if k not in params]
    if missing:
        warnings.warn(
            f"checkpoint {str(path)!r} has no refiner weights ({', '.join(missing)}): they are "
            "freshly initialised (an untrained refiner returns SAM's mask almost unchanged)",
            stacklevel=2,
        )
        fresh = init_samref_params(
            config, rng if rng is not None else jax.random.key(0), sam_params=params["sam"]
        )
        for k in missing:
            params[k] = fresh[k]
    return params, config, meta
