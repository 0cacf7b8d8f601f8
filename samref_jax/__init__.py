"""samref-jax: SAM-REF (GlobalDiff + PatchDiff refiners on Segment Anything) in JAX/Flax.

Example:
  >>> from samref_jax import load_sam, SamPredictor      # the SAM v1 port
  >>> from samref_jax import SamRefPredictor            # SAM-REF interactive predictor
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_sam": ("samref_jax.sam.build", "load_sam"),
    "SamModel": ("samref_jax.sam.build", "SamModel"),
    "SamPredictor": ("samref_jax.sam.predictor", "SamPredictor"),
    "SamAutomaticMaskGenerator": (
        "samref_jax.sam.automatic_mask_generator",
        "SamAutomaticMaskGenerator",
    ),
    "SamRefPredictor": ("samref_jax.samref.predictor", "SamRefPredictor"),
    "sam_config": ("samref_jax.sam.config", "sam_config"),
    "read_image": ("samref_jax.data.decode", "read_image"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'samref_jax' has no attribute {name!r}")
