"""SAM-REF model configuration (ml_collections): which SAM, both refiners, click encoding.

Example:
  >>> cfg = samref_model_config("vit_b")
  >>> cfg.refiners.patch_diff.patch_size
  256
"""

from __future__ import annotations

from typing import Any

import ml_collections

from samref_jax.refiners.config import default_refiners_config
from samref_jax.sam.config import SamConfig, sam_config

MODES = ("sam", "global", "full")


def samref_model_config(sam_type: str = "vit_b") -> ml_collections.ConfigDict:
    """Defaults for a SAM frame of `sam_type` (`tiny` scales window sizes to its 128 frame)."""
    sam = sam_config(sam_type)
    refiners = default_refiners_config()
    scale = sam.img_size / 1024.0
    if sam.img_size != 1024:
        refiners.patch_diff.patch_size = max(32, int(256 * scale) // 8 * 8)
        refiners.patch_diff.min_side = max(16.0, 64.0 * scale)
        refiners.patch_diff.embed_patch_size = max(4, int(32 * scale))
    else:
        # The whole-frame refiner works on a 256 square (stem stride 2 -> 128x128 features),
        # SAM's own low-res mask size; PatchDiff restores detail in its window.
        refiners.global_diff.input_size = 256
    return ml_collections.ConfigDict(
        dict(
            sam_type=sam_type,
            sam_overrides={},  # SamConfig field overrides (e.g. for a from-scratch small SAM)
            refiners=refiners,
            click_radius=5.0,  # disk radius in ORIGINAL-image pixels (scaled to the frame)
            multimask_first_click=True,  # click 1: best of SAM's 3 masks by predicted IoU
            max_clicks=24,  # static number of click slots (jit compiles once for all clicks)
            first_prev_logit=-20.0,  # "previous final logits" before the first click
            # SAM's next mask_input: "refined" (its low-res logits + the refiners' correction,
            # pooled; see samref.next_mask_input) or "sam" (its own low-res logits only).
            feedback="refined",
        )
    )


def sam_config_from(cfg: ml_collections.ConfigDict) -> SamConfig:
    overrides = dict(cfg.get("sam_overrides", {}) or {})
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return sam_config(cfg.sam_type, **overrides)


def from_jsonable(d: dict[str, Any]) -> ml_collections.ConfigDict:
    # Stored configs from before the feedback rule and the previous-mask channel existed keep
    # their meaning (their parameter trees have no such channel).
    d = dict(d)
    d.setdefault("feedback", "sam")
    if "refiners" in d:
        d["refiners"] = {
            k: {"prev_mask_input": False, **v} if isinstance(v, dict) else v
            for k, v in d["refiners"].items()
        }
    base = samref_model_config(d.get("sam_type", "vit_b"))
    base.unlock()
    merged = ml_collections.ConfigDict(base.to_dict())
    merged.update(d)
    return merged
