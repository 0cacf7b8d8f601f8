"""Loading SAM: a `SamModel` bundles the config, the parameters and the compute dtype.

Example:
  >>> from samref_jax import load_sam
  >>> sam = load_sam("checkpoints/vit_b")  # written by convert_weights.py  # doctest: +SKIP
  >>> sam.config.name                           # doctest: +SKIP
  'vit_b'
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from samref_jax.checkpoint import CheckpointError, load_model_checkpoint
from samref_jax.sam.config import SamConfig, sam_config
from samref_jax.sam.model import Sam


@dataclasses.dataclass
class SamModel:
    """A SAM ready to run: `module.apply({"params": params}, ..., method=...)`."""

    config: SamConfig
    params: Any
    dtype: Any = jnp.float32

    @property
    def module(self) -> Sam:
        return Sam(self.config, self.dtype)


def config_from_metadata(meta: dict[str, Any]) -> SamConfig:
    """Rebuilds the SamConfig stored in checkpoint metadata (falls back to the model type)."""
    stored = meta.get("sam_config")
    if stored:
        fields = {f.name for f in dataclasses.fields(SamConfig)}
        kwargs = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in fields
        }
        return SamConfig(**kwargs)
    return sam_config(meta["model_type"])


def load_sam(directory: str | os.PathLike, dtype: Any = jnp.float32) -> SamModel:
    """Loads the SAM part of a samref-jax checkpoint directory (converted or SAM-REF) or of a
    bundled model (`tiny`, `tiny-sam`), the names `SamRefPredictor.from_checkpoint` takes."""
    from samref_jax.samref.io import resolve_checkpoint  # imports this module

    directory = resolve_checkpoint(directory)
    tree, meta = load_model_checkpoint(directory)
    if "sam" not in tree:
        raise CheckpointError(f"checkpoint {str(directory)!r} holds no SAM parameters")
    config = config_from_metadata(meta)
    params = jax.tree_util.tree_map(jnp.asarray, tree["sam"])
    return SamModel(config=config, params=params, dtype=dtype)
