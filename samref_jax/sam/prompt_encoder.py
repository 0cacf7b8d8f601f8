"""SAM's prompt encoder in a fixed-shape, jit-friendly form.

Points and boxes share one padded token array: `coords` (B, N, 2) are (x, y) in the input
frame's pixels and `labels` (B, N) int32 say what each slot is:

  -1 padding, 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right.

Every slot gets an embedding (SAM's ONNX form: blend by label masks), and `token_mask` says
which tokens the official model would have created. The official predictor appends exactly one
padding point when no box is given, so the first padding slot of such a row is a real token;
further padding is masked out of attention in the decoder, which makes any padded size give the
official, unpadded result.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from samref_jax.sam.common import Dtype, gelu, layer_norm
from samref_jax.sam.config import SamConfig

NUM_POINT_EMBEDDINGS = 4  # negative, positive, box top-left, box bottom-right


class DenseFactors(NamedTuple):
    """The dense prompt (B, S, S, D) as ``features @ kernel + bias[:, None, None]``.

    features (B, S, S, C): the mask branch before its last 1x1 convolution (0 where a row has no
    mask); kernel (C, D): that convolution; bias (B, D): its bias, or `no_mask_embed` where a
    row has no mask. The decoder's first layer projects the C = 16 features instead of the D =
    256 channels (see `samref_jax.sam.transformer.ProjectedInput`).
    """

    features: jax.Array
    kernel: jax.Array
    bias: jax.Array

    def dense(self) -> jax.Array:
        """(B, S, S, D) the dense prompt itself."""
        return self.features @ self.kernel.astype(self.features.dtype) + self.bias[:, None, None]


def token_mask(labels: jax.Array) -> jax.Array:
    """Which prompt slots are tokens of the official model. labels (B, N) -> (B, N) bool."""
    is_pad = labels == -1
    has_box = jnp.any(labels >= 2, axis=-1, keepdims=True)
    has_point = jnp.any((labels == 0) | (labels == 1), axis=-1, keepdims=True)
    first_pad = is_pad & (jnp.cumsum(is_pad.astype(jnp.int32), axis=-1) == 1)
    return ~is_pad | (first_pad & has_point & ~has_box)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates: (..., 2) in [0, 1] -> (..., 2F)."""

    num_pos_feats: int

    def setup(self) -> None:
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix",
            nn.initializers.normal(1.0),
            (2, self.num_pos_feats),
            jnp.float32,
        )

    def encode(self, coords: jax.Array) -> jax.Array:
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def dense(self, size: int) -> jax.Array:
        """Encoding of every cell centre of a size x size grid: (size, size, 2F)."""
        centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
        x = jnp.broadcast_to(centres[None, :], (size, size))
        y = jnp.broadcast_to(centres[:, None], (size, size))
        return self.encode(jnp.stack([x, y], axis=-1))

    def with_coords(self, coords: jax.Array, image_size: int) -> jax.Array:
        """coords (..., 2) in pixels of an image_size frame -> (..., 2F)."""
        return self.encode(coords.astype(jnp.float32) / image_size)


class PromptEncoder(nn.Module):
    """Embeds points/boxes (sparse tokens) and a low-res mask (dense prompt).

    ``mask_cond`` (static) says how rows without a mask skip the mask convolutions: True
    (inference) puts them under one ``cond`` on "any row has a mask", so a batch without masks
    (the first click) does not run them; False (training) always runs them and selects per row
    with ``jnp.where``. Both give the same values in every row; the select has no batch-wide
    predicate, which a batch sharded over devices would have to all-reduce in every round.
    """

    config: SamConfig
    dtype: Dtype = jnp.float32
    mask_cond: bool = True

    def setup(self) -> None:
        cfg = self.config
        dim = cfg.prompt_embed_dim
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        init = nn.initializers.normal(1.0)
        self.point_embeddings = [
            self.param(f"point_embeddings_{i}", init, (1, dim), jnp.float32)
            for i in range(NUM_POINT_EMBEDDINGS)
        ]
        self.not_a_point_embed = self.param("not_a_point_embed", init, (1, dim), jnp.float32)
        self.no_mask_embed = self.param("no_mask_embed", init, (1, dim), jnp.float32)
        c = cfg.mask_in_chans
        self.mask_downscaling_0 = nn.Conv(c // 4, (2, 2), (2, 2), "VALID", dtype=self.dtype)
        self.mask_downscaling_1 = layer_norm(1e-6, self.dtype)
        self.mask_downscaling_3 = nn.Conv(c, (2, 2), (2, 2), "VALID", dtype=self.dtype)
        self.mask_downscaling_4 = layer_norm(1e-6, self.dtype)
        self.mask_downscaling_6 = nn.Conv(dim, (1, 1), dtype=self.dtype)

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image embedding grid: (1, S, S, dim)."""
        return self.pe_layer.dense(self.config.image_embedding_size)[None]

    def embed_points(self, coords: jax.Array, labels: jax.Array) -> jax.Array:
        """coords (B, N, 2) pixels (x, y), labels (B, N) -> sparse embeddings (B, N, dim).

        Adds SAM's +0.5 pixel-centre shift; padding slots get `not_a_point_embed` only.
        """
        pe = self.pe_layer.with_coords(coords + 0.5, self.config.img_size)
        lab = labels[..., None]
        out = jnp.where(lab == -1, 0.0, pe)
        out = out + jnp.where(lab == -1, self.not_a_point_embed, 0.0)
        for i, emb in enumerate(self.point_embeddings):
            out = out + jnp.where(lab == i, emb, 0.0)
        return out

    def mask_features(self, masks: jax.Array) -> jax.Array:
        """masks (B, 4S, 4S) logits -> (B, S, S, C) features before the last 1x1 convolution."""
        x = masks[..., None].astype(self.dtype)
        x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)))
        return gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks (B, 4S, 4S) logits -> dense embedding (B, S, S, dim)."""
        return self.mask_downscaling_6(self.mask_features(masks))

    def dense_factors(self, mask_input: jax.Array, has_mask: jax.Array) -> DenseFactors:
        """The dense prompt as ``features @ kernel + bias`` (see `DenseFactors`).

        mask_input (B, 4S, 4S) logits, used where has_mask (B,) is true; elsewhere the features
        are 0 and the bias is `no_mask_embed`, so the product is exactly the broadcast.
        """
        b = mask_input.shape[0]
        s, c = self.config.image_embedding_size, self.config.mask_in_chans
        conv = self.mask_downscaling_6.variables["params"]
        kernel = conv["kernel"].reshape(c, -1)
        zeros = jnp.zeros((b, s, s, c), self.dtype)

        def with_masks(mdl: PromptEncoder, masks: jax.Array, zeros: jax.Array) -> jax.Array:
            feats = jnp.where(has_mask[:, None, None, None], mdl.mask_features(masks), 0)
            return feats.astype(zeros.dtype)

        if self.mask_cond:
            features = nn.cond(
                jnp.any(has_mask), with_masks, lambda mdl, m, z: z, self, mask_input, zeros
            )
        else:
            features = with_masks(self, mask_input, zeros)
        bias = jnp.where(has_mask[:, None], conv["bias"][None], self.no_mask_embed)
        return DenseFactors(features, kernel, bias)

    def __call__(
        self,
        coords: jax.Array,
        labels: jax.Array,
        mask_input: jax.Array | None = None,
        has_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (sparse (B, N, dim), token_mask (B, N) bool, dense (B, S, S, dim)).

        mask_input (B, 4S, 4S) logits is used where has_mask (B,) is true; elsewhere (and when
        it is None) the dense prompt is `no_mask_embed` broadcast over the grid.
        """
        b = coords.shape[0]
        s = self.config.image_embedding_size
        sparse = self.embed_points(coords, labels)
        no_mask = jnp.broadcast_to(
            self.no_mask_embed.reshape(1, 1, 1, -1), (b, s, s, self.config.prompt_embed_dim)
        )
        if mask_input is None:
            dense = no_mask
            # Touch the mask branch at init so every parameter exists.
            if self.is_initializing():
                self.embed_masks(jnp.zeros((1, 4 * s, 4 * s), jnp.float32))
        else:
            if has_mask is None:
                has_mask = jnp.ones((b,), bool)

            def with_masks(mdl: PromptEncoder, masks: jax.Array, no_mask: jax.Array) -> jax.Array:
                dense = jnp.where(has_mask[:, None, None, None], mdl.embed_masks(masks), no_mask)
                return dense.astype(no_mask.dtype)

            if self.is_initializing() or not self.mask_cond:
                dense = with_masks(self, mask_input, no_mask)
            else:
                # The mask convolutions run only when some row has a mask (under vmap both
                # branches run and the result is selected).
                dense = nn.cond(
                    jnp.any(has_mask),
                    with_masks,
                    lambda mdl, masks, no_mask: no_mask,
                    self,
                    mask_input,
                    no_mask,
                )
        return sparse, token_mask(labels), dense.astype(self.dtype)
