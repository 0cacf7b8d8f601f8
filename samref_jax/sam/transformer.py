"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Token masks: `key_mask` (B, N) marks the prompt tokens that exist; masked tokens are removed
from every softmax over tokens, so padded prompts give the unpadded result.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from samref_jax.sam.common import Dtype, MLPBlock, layer_norm

_DECODER_EPS = 1e-5  # torch.nn.LayerNorm default, used by the two-way transformer.


class Attention(nn.Module):
    """Multi-head attention with q/k/v projected to `dim // downsample_rate` channels.

    q (B, Nq, D), k (B, Nk, D), v (B, Nk, D), key_mask (B, Nk) bool or None -> (B, Nq, D).
    """

    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None
    ) -> jax.Array:
        dim = q.shape[-1]
        internal = dim // self.downsample_rate
        head = internal // self.num_heads
        q = nn.Dense(internal, dtype=self.dtype, name="q_proj")(q)
        k = nn.Dense(internal, dtype=self.dtype, name="k_proj")(k)
        v = nn.Dense(internal, dtype=self.dtype, name="v_proj")(v)

        def split(x: jax.Array) -> jax.Array:
            b, n, _ = x.shape
            return x.reshape(b, n, self.num_heads, head).transpose(0, 2, 1, 3)

        q, k, v = split(q), split(k), split(v)
        attn = jnp.einsum("bhqc,bhkc->bhqk", q, k) / jnp.sqrt(jnp.asarray(head, self.dtype))
        attn = attn.astype(jnp.float32)
        if key_mask is not None:
            attn = jnp.where(key_mask[:, None, None, :], attn, -jnp.inf)
        attn = jax.nn.softmax(attn, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkc->bhqc", attn, v)
        b, _, n, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, n, internal)
        return nn.Dense(dim, dtype=self.dtype, name="out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token; post-norm after each.

    Layer 0 (`skip_first_layer_pe`) applies self-attention without PE and without residual.
    """

    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        queries: jax.Array,
        keys: jax.Array,
        query_pe: jax.Array,
        key_pe: jax.Array,
        token_mask: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        self_attn = Attention(self.num_heads, 1, self.dtype, name="self_attn")
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries, token_mask)
        queries = layer_norm(_DECODER_EPS, self.dtype, name="norm1")(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = queries + Attention(
            self.num_heads, self.downsample_rate, self.dtype, name="cross_attn_token_to_image"
        )(q, k, keys)
        queries = layer_norm(_DECODER_EPS, self.dtype, name="norm2")(queries)

        queries = queries + MLPBlock(self.mlp_dim, "relu", self.dtype, name="mlp")(queries)
        queries = layer_norm(_DECODER_EPS, self.dtype, name="norm3")(queries)

        q = queries + query_pe
        k = keys + key_pe
        keys = keys + Attention(
            self.num_heads, self.downsample_rate, self.dtype, name="cross_attn_image_to_token"
        )(k, q, queries, token_mask)
        keys = layer_norm(_DECODER_EPS, self.dtype, name="norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """image (B, S, S, D), image_pe (B or 1, S, S, D), tokens (B, N, D), token_mask (B, N)
    -> (queries (B, N, D), keys (B, S*S, D))."""

    depth: int
    num_heads: int
    mlp_dim: int
    attention_downsample_rate: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        image_embedding: jax.Array,
        image_pe: jax.Array,
        point_embedding: jax.Array,
        token_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        b, h, w, d = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, d)
        key_pe = jnp.broadcast_to(image_pe.reshape(-1, h * w, d), (b, h * w, d))
        queries = point_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads,
                self.mlp_dim,
                self.attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                dtype=self.dtype,
                name=f"layers_{i}",
            )(queries, keys, point_embedding, key_pe, token_mask)
        q = queries + point_embedding
        k = keys + key_pe
        queries = queries + Attention(
            self.num_heads,
            self.attention_downsample_rate,
            self.dtype,
            name="final_attn_token_to_image",
        )(q, k, keys)
        queries = layer_norm(_DECODER_EPS, self.dtype, name="norm_final_attn")(queries)
        return queries, keys
