"""PatchDiff: the local-window refiner, called once per click (docs/design.md, 'PatchDiff window',
'PatchDiff crop and paste')."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from samref_jax.refiners.clicks import draw_disks, work_hw
from samref_jax.refiners.refiner import (
    DiffRefiner,
)
from samref_jax.refiners.window import (
    clicks_to_patch,
    crop_patches,
    paste_patches,
    patch_radius,
    select_window,
)

Array = jax.Array


class PatchDiffOutput(NamedTuple):
    """PatchDiff outputs (float32).

    logits: (B, H, W) final logits F (= global logits outside the window).
    window: (B, 4) (x0, y0, x1, y1) frame pixel-edge units (see ``window.py``).
    patch_logits / patch_detail / patch_error_logits: (B, P, P) refiner outputs in the patch.
    patch_coarse: (B, P, P) the global logits G cropped to the patch (the refiner's S).
    Ground truth in patch space: ``crop_patches(gt.astype(float32), window, P) > 0.5``.
    """

    logits: Array
    window: Array
    patch_logits: Array
    patch_detail: Array
    patch_error_logits: Array
    patch_coarse: Array


class PatchDiff(nn.Module):
    """Local-window refiner. ``cfg``: see :func:`default_patch_diff_config`; ``dtype``: compute
    dtype (None: ``cfg.dtype``), parameters stay float32."""

    cfg: Any
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        image: Array,
        coords: Array,
        labels: Array,
        global_logits: Array,
        prev_logits: Array,
        embedding: Array,
        radius: Array,
        last_click_xy: Array,
        valid_hw: Array,
        detail_image: Array | None = None,
    ) -> PatchDiffOutput:
        """Select a window, refine it at P x P, paste it back.

        Args:
          image: (B, H, W, 3) normalised (padded) image.
          coords: (B, N, 2) click (x, y), pixel-centre frame units; labels: (B, N) 1/0/-1.
          global_logits: (B, H, W) GlobalDiff logits G.
          prev_logits: (B, H, W) previous final logits (any negative constant, e.g. -20, at the
            first click).
          embedding: (B, h, w, E) SAM image embedding covering the whole frame.
          radius: (B,) or scalar click-disk radius in frame pixels.
          last_click_xy: (B, 2) last click (x, y), pixel-centre frame units.
          valid_hw: (B, 2) int (height, width) of the unpadded image in the frame.
          detail_image: optional (B, kH, kW, 3) the same normalised image at k = ``image_scale``
            times the frame's resolution: the image patch is cropped from it (required when
            ``cfg.image_scale > 1``).

        Returns:
          PatchDiffOutput.
        """
        cfg = self.cfg
        p = int(cfg.patch_size)
        b, h, w = global_logits.shape
        radius = jnp.broadcast_to(jnp.asarray(radius, jnp.float32), (b,))

        sel = lambda prev, new, c, v: select_window(prev, new, c, v, cfg)
        windows = jax.vmap(sel)(prev_logits > 0, global_logits > 0, last_click_xy, valid_hw)
        windows = jax.lax.stop_gradient(windows)

        stride = (h / embedding.shape[1], w / embedding.shape[2])
        k = int(cfg.get("image_scale", 1))
        if k > 1:
            if detail_image is None or detail_image.shape[1:3] != (k * h, k * w):
                got = None if detail_image is None else detail_image.shape
                raise ValueError(
                    f"patch_diff.image_scale={k} needs a detail image of {(b, k * h, k * w, 3)}, "
                    f"got {got}"
                )
            img_p = crop_patches(detail_image, windows, p, 1.0 / k, cfg.image_sampling_ratio)
        else:
            img_p = crop_patches(image, windows, p, 1.0, cfg.image_sampling_ratio)
        coarse_p = crop_patches(global_logits, windows, p, 1.0, cfg.logit_sampling_ratio)
        emb_p = crop_patches(embedding, windows, int(cfg.embed_patch_size), stride)

        coords_p = clicks_to_patch(coords, windows[:, None, :], p)
        radius_p = patch_radius(radius, windows, p)
        disks = draw_disks(coords_p, labels, radius_p, (p, p), work_hw(cfg, (p, p)))

        prev_p = None
        if cfg.get("prev_mask_input", False):
            prev_p = crop_patches(prev_logits, windows, p, 1.0, cfg.logit_sampling_ratio)
        out = DiffRefiner(cfg, self.dtype, name="refiner")(
            img_p, disks, coarse_p, emb_p, prev_logits=prev_p
        )
        if cfg.paste_mode == "residual":
            final = paste_patches(global_logits, out.logits - coarse_p, windows, add=True)
        elif cfg.paste_mode == "replace":
            final = paste_patches(global_logits, out.logits, windows)
        else:
            raise ValueError(f"unknown paste_mode {cfg.paste_mode!r}")
        return PatchDiffOutput(
            logits=final,
            window=windows,
            patch_logits=out.logits,
            patch_detail=out.detail,
            patch_error_logits=out.error_logits,
            patch_coarse=coarse_p,
        )
