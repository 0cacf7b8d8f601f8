"""SAM's mask decoder: two-way transformer, output upscaling 4x, hypernetwork MLPs, IoU head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from samref_jax.sam.common import MLP, ConvTranspose2x2, Dtype, gelu, layer_norm
from samref_jax.sam.config import SamConfig
from samref_jax.sam.prompt_encoder import DenseFactors
from samref_jax.sam.transformer import Layer0Inputs, TwoWayTransformer, layer0_image_projections


class MaskDecoder(nn.Module):
    """Predicts all 1 + num_multimask_outputs masks and their IoU.

    image_embeddings (B, S, S, D), image_pe (1, S, S, D), sparse (B, N, D), token_mask (B, N),
    dense (B, S, S, D) -> masks (B, 4, 4S, 4S) logits and iou_pred (B, 4). Index 0 is the
    single-mask token; 1..3 are the multimask outputs (see `select_masks`).

    With the image's `layer0_projections` (computed once per image) and `dense` as
    `DenseFactors`, the first transformer layer skips its three per-image products.
    """

    config: SamConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse: jax.Array,
        token_mask: jax.Array | None,
        dense: jax.Array | DenseFactors,
        layer0_projections: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dim = cfg.prompt_embed_dim
        num_masks = cfg.num_multimask_outputs + 1
        b = sparse.shape[0]
        init = nn.initializers.normal(1.0)
        iou_token = self.param("iou_token", init, (1, dim), jnp.float32)
        mask_tokens = self.param("mask_tokens", init, (num_masks, dim), jnp.float32)
        output_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0)
        output_tokens = jnp.broadcast_to(output_tokens[None], (b, 1 + num_masks, dim))
        tokens = jnp.concatenate([output_tokens, sparse.astype(output_tokens.dtype)], axis=1)
        if token_mask is not None:
            token_mask = jnp.concatenate([jnp.ones((b, 1 + num_masks), bool), token_mask], axis=1)

        layer0 = None
        if isinstance(dense, DenseFactors):
            if layer0_projections is not None:
                s = image_embeddings.shape[1]
                feats = dense.features.reshape(b, s * s, -1)
                layer0 = Layer0Inputs(layer0_projections, feats, dense.kernel, dense.bias)
            dense = dense.dense()
        elif layer0_projections is not None:
            raise ValueError("layer0_projections need the dense prompt as DenseFactors")
        src = jnp.broadcast_to(image_embeddings, dense.shape) + dense
        hs, src = TwoWayTransformer(
            cfg.decoder_depth,
            cfg.decoder_num_heads,
            cfg.decoder_mlp_dim,
            2,
            self.dtype,
            name="transformer",
        )(
            src.astype(self.dtype),
            image_pe.astype(self.dtype),
            tokens.astype(self.dtype),
            token_mask,
            layer0,
        )
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + num_masks]

        s = image_embeddings.shape[1]
        src = src.reshape(b, s, s, dim)
        x = ConvTranspose2x2(dim // 4, self.dtype, name="output_upscaling_0")(src)
        x = gelu(layer_norm(1e-6, self.dtype, name="output_upscaling_1")(x))
        x = gelu(ConvTranspose2x2(dim // 8, self.dtype, name="output_upscaling_3")(x))
        hyper_in = jnp.stack(
            [
                MLP(dim, dim // 8, 3, self.dtype, name=f"output_hypernetworks_mlps_{i}")(
                    mask_tokens_out[:, i]
                )
                for i in range(num_masks)
            ],
            axis=1,
        )  # (B, 4, C/8)
        # (B, HW, C) @ (B, C, 4), then a transpose of the small result: as an einsum straight to
        # (B, 4, H, W) XLA:CPU fuses the GELU above into a multiply-reduce and evaluates it once
        # per mask (4.7 vs 1.9 ms at 256x256x32).
        h4, w4 = x.shape[1], x.shape[2]
        masks = jnp.matmul(x.reshape(b, h4 * w4, -1), hyper_in.transpose(0, 2, 1))
        masks = masks.transpose(0, 2, 1).reshape(b, num_masks, h4, w4)
        iou_pred = MLP(
            cfg.iou_head_hidden_dim,
            num_masks,
            cfg.iou_head_depth,
            self.dtype,
            name="iou_prediction_head",
        )(iou_token_out)
        return masks.astype(jnp.float32), iou_pred.astype(jnp.float32)

    def layer0_projections(
        self, image_embeddings: jax.Array, image_pe: jax.Array
    ) -> dict[str, jax.Array]:
        """The per-image part of the transformer's first layer (see `layer0_image_projections`):
        image_embeddings (B, S, S, D), image_pe (1, S, S, D) -> dict of (B, S*S, D / 2) or,
        for the token-to-image keys and values, (B, D / 2, S*S)."""
        params = self.variables["params"]["transformer"]
        return layer0_image_projections(params, image_embeddings, image_pe, self.dtype)


def select_masks(
    masks: jax.Array, iou_pred: jax.Array, multimask_output: bool
) -> tuple[jax.Array, jax.Array]:
    """SAM's output slice: tokens 1..3 when multimask, else token 0. (B, 4, ...) -> (B, C, ...)."""
    if multimask_output:
        return masks[:, 1:], iou_pred[:, 1:]
    return masks[:, :1], iou_pred[:, :1]
