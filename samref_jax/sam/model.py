"""The whole SAM: image encoder + prompt encoder + mask decoder as one Linen module.

Parameters are a plain pytree `{"image_encoder": ..., "prompt_encoder": ..., "mask_decoder":
...}`. Two entry points, used through `Sam.apply(..., method=...)`:

  * `embed_image(images)`: (B, 1024, 1024, 3) preprocessed -> (B, 64, 64, 256).
  * `predict_masks(embeddings, coords, labels, mask_input, has_mask, image_pe=None)`: all four
    mask tokens, (B, 4, 256, 256) low-res logits and (B, 4) IoU predictions.
  * `dense_pe()`: the (1, 64, 64, 256) positional encoding of the embedding grid. It depends
    on the parameters only, so an interactive caller computes it once and passes it as
    `image_pe` (the same numbers; saves two 64x64x128 sin/cos maps per prompt).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from samref_jax.sam import Sam, sam_config
  >>> model = Sam(sam_config("tiny"))
  >>> params = jax.jit(model.init)(jax.random.key(0))["params"]
  >>> emb = model.apply({"params": params}, jnp.zeros((1, 128, 128, 3)), method=Sam.embed_image)
  >>> emb.shape
  (1, 8, 8, 32)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from samref_jax.sam.common import Dtype
from samref_jax.sam.config import SamConfig
from samref_jax.sam.image_encoder import ImageEncoderViT
from samref_jax.sam.mask_decoder import MaskDecoder
from samref_jax.sam.prompt_encoder import PromptEncoder


class Sam(nn.Module):
    """Segment Anything v1. `dtype` is the compute dtype (params stay float32); `mask_cond`:
    see `PromptEncoder` (False in training: per-row select, no batch-wide cond)."""

    config: SamConfig
    dtype: Dtype = jnp.float32
    mask_cond: bool = True

    def setup(self) -> None:
        self.image_encoder = ImageEncoderViT(self.config, self.dtype)
        self.prompt_encoder = PromptEncoder(self.config, self.dtype, self.mask_cond)
        self.mask_decoder = MaskDecoder(self.config, self.dtype)

    def __call__(self) -> None:  # Used by `init` only: creates every parameter.
        cfg = self.config
        s = cfg.image_embedding_size
        emb = self.embed_image(jnp.zeros((1, cfg.img_size, cfg.img_size, 3), jnp.float32))
        coords = jnp.zeros((1, 2, 2), jnp.float32)
        labels = jnp.array([[1, -1]], jnp.int32)
        self.predict_masks(emb, coords, labels, jnp.zeros((1, 4 * s, 4 * s)), jnp.ones((1,), bool))

    def embed_image(self, images: jax.Array) -> jax.Array:
        """images (B, img_size, img_size, 3), normalised and padded -> (B, S, S, D) float32."""
        return self.image_encoder(images).astype(jnp.float32)

    def predict_masks(
        self,
        image_embeddings: jax.Array,
        coords: jax.Array,
        labels: jax.Array,
        mask_input: jax.Array | None = None,
        has_mask: jax.Array | None = None,
        image_pe: jax.Array | None = None,
        layer0_projections: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Prompt encoder + mask decoder.

        image_embeddings (B, S, S, D); coords (B, N, 2) (x, y) frame pixels; labels (B, N) int32
        in {-1, 0, 1, 2, 3}; mask_input (B, 4S, 4S) logits used where has_mask (B,) is true;
        image_pe (1, S, S, D) from :meth:`dense_pe` (None: computed here); layer0_projections
        from :meth:`layer0_projections` for these embeddings (None: computed in the decoder).
        Returns low-res logits (B, 4, 4S, 4S) and IoU predictions (B, 4), token 0 first.
        """
        factored = layer0_projections is not None
        sparse, tmask, dense = self.prompt_encoder(
            coords, labels, None if factored else mask_input, has_mask
        )
        if image_pe is None:
            image_pe = self.prompt_encoder.get_dense_pe()
        if factored:
            b = coords.shape[0]
            s = self.config.image_embedding_size
            if mask_input is None:
                mask_input = jnp.zeros((b, 4 * s, 4 * s), jnp.float32)
                has_mask = jnp.zeros((b,), bool)
            elif has_mask is None:
                has_mask = jnp.ones((b,), bool)
            dense = self.prompt_encoder.dense_factors(mask_input, has_mask)
        return self.mask_decoder(
            image_embeddings, image_pe, sparse, tmask, dense, layer0_projections
        )

    def layer0_projections(
        self, image_embeddings: jax.Array, image_pe: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Per-image work of the decoder's first layer, for :meth:`predict_masks`: computed once
        per image, it saves three (S*S, D) x (D, D / 2) products per prompt."""
        if image_pe is None:
            image_pe = self.prompt_encoder.get_dense_pe()
        return self.mask_decoder.layer0_projections(image_embeddings, image_pe)

    def dense_pe(self) -> jax.Array:
        """(1, S, S, D) positional encoding of the embedding grid (parameters only)."""
        return self.prompt_encoder.get_dense_pe()


def init_sam_params(config: SamConfig, rng: jax.Array) -> dict:
    """Random parameters of the whole model (float32 pytree)."""
    return Sam(config).init(rng)["params"]


def count_params(params: dict) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
