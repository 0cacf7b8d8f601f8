"""Refiner configs: GlobalDiff, PatchDiff and both together (ml_collections)."""

from __future__ import annotations

import ml_collections

from samref_jax.refiners.refiner import default_refiner_config
from samref_jax.refiners.window import default_window_config


def default_global_diff_config() -> ml_collections.ConfigDict:
    """GlobalDiff config: the DiffRefiner fields (see ``default_refiner_config``)."""
    return default_refiner_config()


def default_patch_diff_config() -> ml_collections.ConfigDict:
    """PatchDiff config: DiffRefiner fields + window fields (see ``default_window_config``)."""
    cfg = default_refiner_config()
    cfg.update(default_window_config())
    # The image patch is cropped from a copy of the image at image_scale x the frame
    # (``ImageContext.detail_image``), so detail lost when the image was shrunk to the frame
    # reaches PatchDiff; 1: crop from the frame itself.
    cfg.image_scale = 1
    return cfg


def default_refiners_config() -> ml_collections.ConfigDict:
    """Both refiners: ``global_diff`` and ``patch_diff`` sub-configs."""
    return ml_collections.ConfigDict(
        dict(global_diff=default_global_diff_config(), patch_diff=default_patch_diff_config())
    )
