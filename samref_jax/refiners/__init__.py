"""SAM-REF refiners: GlobalDiff and PatchDiff (docs/design.md, 'SAM-REF reconstruction')."""

from samref_jax.refiners.clicks import batch_disk_maps, disk_maps, scale_clicks
from samref_jax.refiners.config import (
    default_global_diff_config,
    default_patch_diff_config,
    default_refiners_config,
)
from samref_jax.refiners.global_diff import GlobalDiff
from samref_jax.refiners.patch_diff import PatchDiff, PatchDiffOutput
from samref_jax.refiners.refiner import (
    DiffRefiner,
    RefinerContext,
    RefinerOutput,
    default_refiner_config,
)
from samref_jax.refiners.window import (
    clicks_to_patch,
    crop_patch,
    crop_patches,
    default_window_config,
    inside_window,
    paste_patch,
    paste_patches,
    patch_radius,
    select_window,
)

__all__ = [
    "DiffRefiner",
    "GlobalDiff",
    "PatchDiff",
    "PatchDiffOutput",
    "RefinerContext",
    "RefinerOutput",
    "batch_disk_maps",
    "clicks_to_patch",
    "crop_patch",
    "crop_patches",
    "default_global_diff_config",
    "default_patch_diff_config",
    "default_refiner_config",
    "default_refiners_config",
    "default_window_config",
    "disk_maps",
    "inside_window",
    "paste_patch",
    "paste_patches",
    "patch_radius",
    "scale_clicks",
    "select_window",
]
