"""GlobalDiff: the whole-frame refiner, called once per click (docs/design.md, 'GlobalDiff')."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from samref_jax.refiners.clicks import draw_disks, work_hw
from samref_jax.refiners.refiner import DiffRefiner, RefinerContext, RefinerOutput

Array = jax.Array


class GlobalDiff(nn.Module):
    """Whole-frame refiner. ``cfg``: see :func:`default_global_diff_config`; ``dtype``: compute
    dtype (None: ``cfg.dtype``), parameters stay float32."""

    cfg: Any
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        image: Array | None,
        coords: Array | None,
        labels: Array | None,
        coarse_logits: Array | None,
        embedding: Array | None,
        radius: Array | None,
        context: RefinerContext | None = None,
        context_only: bool = False,
        prev_logits: Array | None = None,
    ) -> RefinerOutput | RefinerContext:
        """Refine SAM's coarse logits over the whole frame.

        Args:
          image: (B, H, W, 3) normalised (padded) image.
          coords: (B, N, 2) click (x, y), pixel-centre frame units; labels: (B, N) 1/0/-1.
          coarse_logits: (B, H, W) SAM logits S upsampled to the frame.
          embedding: (B, h, w, E) SAM image embedding (e.g. 64x64x256).
          radius: (B,) or scalar click-disk radius in frame pixels.
          context: this image's :class:`RefinerContext` (None: computed here; same numbers).
          context_only: return the RefinerContext of ``image`` and ``embedding`` (the other
            arguments may be None): the per-image part, computed once per image.
          prev_logits: (B, H, W) the previous click's final logits (``prev_mask_input``).

        Returns:
          RefinerOutput of (B, H, W) float32 maps; ``logits`` is G (or the RefinerContext).
        """
        refiner = DiffRefiner(self.cfg, self.dtype, name="refiner")
        if context_only:
            return refiner(image, None, None, embedding, context_only=True)
        b, h, w = coarse_logits.shape
        radius = jnp.broadcast_to(jnp.asarray(radius, jnp.float32), (b,))
        disks = draw_disks(coords, labels, radius, (h, w), work_hw(self.cfg, (h, w)))
        return refiner(
            image, disks, coarse_logits, embedding, context=context, prev_logits=prev_logits
        )
