"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Token masks: `key_mask` (B, N) marks the prompt tokens that exist; masked tokens are removed
from every softmax over tokens, so padded prompts give the unpadded result.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from samref_jax.sam.common import Dtype, KernelAndBias, MLPBlock, layer_norm

_DECODER_EPS = 1e-5  # torch.nn.LayerNorm default, used by the two-way transformer.


class ProjectedInput(NamedTuple):
    """An `Attention` input ``x = base + features @ kernel + bias`` whose ``base @ W`` is known.

    projection: (B, N, I) ``base @ W`` (no bias) for the one projection ``W`` (D, I) this input
    feeds, or (B, I, N) when ``transposed``; features: (B, N, R); kernel: (R, D); bias: (B, D).
    Projecting it costs ``N R I`` multiply-adds instead of ``N D I``: layer 0 of the decoder
    sees the image embedding (known per image) plus the dense prompt, a 1x1 convolution of
    R = 16 mask features.
    """

    projection: jax.Array
    features: jax.Array
    kernel: jax.Array
    bias: jax.Array
    transposed: bool = False


class Layer0Inputs(NamedTuple):
    """Layer 0's image side as known per image (`layer0_image_projections`) plus the dense
    prompt's factors: features (B, S*S, R), kernel (R, D), bias (B, D)."""

    projections: dict[str, jax.Array]
    features: jax.Array
    kernel: jax.Array
    bias: jax.Array

    def input(self, name: str) -> ProjectedInput:
        transposed = name in _TRANSPOSED
        p = self.projections[name]
        return ProjectedInput(p, self.features, self.kernel, self.bias, transposed)


def _project(x: jax.Array | ProjectedInput, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x @ w + b`` for an array (B, N, D) or a `ProjectedInput`; (B, N, I)."""
    if isinstance(x, ProjectedInput):
        if x.transposed:
            return _project_t(x, w, b).transpose(0, 2, 1)
        low_rank = x.features.astype(w.dtype) @ (x.kernel.astype(w.dtype) @ w)
        return x.projection.astype(w.dtype) + low_rank + (x.bias.astype(w.dtype) @ w + b)[:, None]
    return x @ w + b


def _project_t(x: jax.Array | ProjectedInput, w: jax.Array, b: jax.Array) -> jax.Array:
    """``(x @ w + b)`` transposed to (B, I, N), computed in that layout (no copy after)."""
    if isinstance(x, ProjectedInput):
        if not x.transposed:
            return _project(x, w, b).transpose(0, 2, 1)
        kw = x.kernel.astype(w.dtype) @ w  # (R, I)
        low_rank = jnp.einsum("ri,bnr->bin", kw, x.features.astype(w.dtype))
        return x.projection.astype(w.dtype) + low_rank + (x.bias.astype(w.dtype) @ w + b)[..., None]
    return jnp.einsum("di,bnd->bin", w, x) + b[:, None]


def _dims(x: jax.Array | ProjectedInput) -> tuple[int, int, int]:
    """(B, N, D) of an `Attention` input."""
    if isinstance(x, ProjectedInput):
        b, n = x.features.shape[:2]
        return b, n, x.kernel.shape[-1]
    return x.shape


# Layer 0's projections of the image tokens that depend on the image only (plus the dense
# prompt, added through its factors): (attention, projection, whether the PE is added).
_LAYER0_IMAGE_PROJECTIONS = {
    "t2i_k": ("cross_attn_token_to_image", "k_proj", True),
    "t2i_v": ("cross_attn_token_to_image", "v_proj", False),
    "i2t_q": ("cross_attn_image_to_token", "q_proj", True),
}
# Kept in (B, I, S*S): the layout the token-to-image products read (see `Attention`).
_TRANSPOSED = ("t2i_k", "t2i_v")


def layer0_image_projections(
    params: dict, image_embedding: jax.Array, image_pe: jax.Array, dtype: Dtype = jnp.float32
) -> dict[str, jax.Array]:
    """The per-image part of layer 0's image-token projections (no biases).

    params: the `TwoWayTransformer`'s parameters; image_embedding (B, S, S, D); image_pe
    (1, S, S, D) -> {"i2t_q": (B, S*S, I), "t2i_k", "t2i_v": (B, I, S*S)} (the token-to-image
    keys and values in the layout their products read). Pass them (with the dense prompt in
    factored form) as `TwoWayTransformer(..., layer0=...)`: every click of an image then skips
    three (S*S, D) x (D, I) products. Same numbers up to float32 re-association.
    """
    b, h, w, d = image_embedding.shape
    e = image_embedding.reshape(b, h * w, d).astype(dtype)
    e_pe = e + image_pe.reshape(-1, h * w, d).astype(dtype)
    out = {}
    for name, (attn, proj, with_pe) in _LAYER0_IMAGE_PROJECTIONS.items():
        kernel = params["layers_0"][attn][proj]["kernel"].astype(dtype)
        x = e_pe if with_pe else e
        out[name] = jnp.einsum("di,bnd->bin", kernel, x) if name in _TRANSPOSED else x @ kernel
    return out


def attention_order(nq: int, nk: int, dim: int, internal: int, num_heads: int) -> str:
    """The cheapest of three exact evaluation orders of `Attention` for these static sizes.

    "project": project q, k and v, attend, project out (the official order).
    "fold_keys": fold `k_proj` into the queries and `v_proj` after the weighted sum, so the
      Nk keys are never projected (a few prompt tokens attending to 64x64 image tokens).
    "fold_queries": fold `q_proj` into the keys and `out_proj` into the values, so the Nq
      queries are never projected (64x64 image tokens attending to a few prompt tokens).
    All three give the same numbers up to float32 re-association (~1e-7 relative).
    """
    per_pair = nq * nk
    cost = {
        "project": (nq + 2 * nk) * dim * internal + 2 * per_pair * internal + nq * internal * dim,
        "fold_keys": 2 * nq * internal * dim + 2 * num_heads * per_pair * dim + nq * internal * dim,
        "fold_queries": 2 * nk * internal * dim + 2 * num_heads * per_pair * dim,
    }
    return min(cost, key=cost.__getitem__)


class Attention(nn.Module):
    """Multi-head attention with q/k/v projected to `dim // downsample_rate` channels.

    q (B, Nq, D), k (B, Nk, D), v (B, Nk, D), key_mask (B, Nk) bool or None -> (B, Nq, D).

    The evaluation order is chosen from the static shapes by `attention_order` (or forced with
    `order`); parameters and results do not depend on it.
    """

    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32
    order: str = "auto"

    @nn.compact
    def __call__(
        self,
        q: jax.Array | ProjectedInput,
        k: jax.Array | ProjectedInput,
        v: jax.Array | ProjectedInput,
        key_mask: jax.Array | None = None,
    ) -> jax.Array:
        b, nq, dim = _dims(q)
        nk = _dims(k)[1]
        internal = dim // self.downsample_rate
        nh = self.num_heads
        head = internal // nh
        dt = self.dtype
        wq, bq = (x.astype(dt) for x in KernelAndBias((dim, internal), name="q_proj")())
        wk, bk = (x.astype(dt) for x in KernelAndBias((dim, internal), name="k_proj")())
        wv, bv = (x.astype(dt) for x in KernelAndBias((dim, internal), name="v_proj")())
        wo, bo = (x.astype(dt) for x in KernelAndBias((internal, dim), name="out_proj")())
        q, k, v = (x if isinstance(x, ProjectedInput) else x.astype(dt) for x in (q, k, v))
        scale = jnp.sqrt(jnp.asarray(head, dt))
        order = self.order
        if any(isinstance(x, ProjectedInput) for x in (q, k, v)):
            order = "project"  # the other orders fold a projection elsewhere
        elif order == "auto":
            order = attention_order(nq, nk, dim, internal, nh)

        def masked(logits: jax.Array, axis: int = -1) -> jax.Array:
            """Logits (B, ...) in fp32 with masked keys (along `axis`) set to -inf."""
            logits = logits.astype(jnp.float32)
            if key_mask is None:
                return logits
            axis %= logits.ndim
            mask_shape = [b if i == 0 else nk if i == axis else 1 for i in range(logits.ndim)]
            return jnp.where(key_mask.reshape(mask_shape), logits, -jnp.inf)

        def softmax(logits: jax.Array, axis: int = -1) -> jax.Array:
            """Softmax over the keys' `axis` of logits (B, ...), masked keys removed, in fp32."""
            return jax.nn.softmax(masked(logits, axis), axis=axis).astype(dt)

        def unnormalised_softmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
            """`(exp(logits - max), sum)` over the last axis, masked keys removed, in fp32."""
            logits = masked(logits)
            e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
            return e, jnp.sum(e, axis=-1, keepdims=True)

        wq_h, wk_h, wv_h = (w.reshape(dim, nh, head) for w in (wq, wk, wv))
        wo_h = wo.reshape(nh, head, dim)
        if order == "project":
            qh = _project(q, wq, bq).reshape(b, nq, nh, head)
            if nk > nq:
                # Many keys: project them straight into the per-head (B, H, C, Nk) layout the
                # batched products read (a transposed product instead of a copy afterwards).
                kh = _project_t(k, wk, bk).reshape(b, nh, head, nk)
                logits = jnp.einsum("bqhc,bhck->bhqk", qh, kh)
            else:
                kh = _project(k, wk, bk).reshape(b, nk, nh, head)
                logits = jnp.einsum("bqhc,bkhc->bhqk", qh, kh)
            # The softmax's normalisation after the product with v: one division per (query,
            # channel) instead of per (query, key); the same function up to float32 rounding
            # (as in the image encoder's attention).
            e, denom = unnormalised_softmax(logits / scale)
            if nk > nq:
                vh = _project_t(v, wv, bv).reshape(b, nh, head, nk)
                out = jnp.einsum("bhqk,bhck->bqhc", e.astype(dt), vh).astype(jnp.float32)
            else:
                vh = _project(v, wv, bv).reshape(b, nk, nh, head)
                out = jnp.einsum("bhqk,bkhc->bqhc", e.astype(dt), vh).astype(jnp.float32)
            out = (out / denom.transpose(0, 2, 1, 3)).astype(dt).reshape(b, nq, internal)
            return out @ wo + bo
        if order == "fold_keys":
            qh = (q @ wq + bq).reshape(b, nq, nh, head)
            # q_h . (k W_k,h + b_k,h) = (q_h W_k,h^T) . k + q_h . b_k,h
            qk = jnp.einsum("bqhc,dhc->bdhq", qh, wk_h)
            # Keys stay in their (Nk, D) layout: logits are (B, Nk, H, Nq), softmax over axis 1.
            logits = jnp.einsum("bkd,bdhq->bkhq", k, qk)
            logits = logits + jnp.einsum("bqhc,hc->bhq", qh, bk.reshape(nh, head))[:, None]
            attn = softmax(logits / scale, axis=1)
            # sum_k a_k (v_k W_v,h + b_v,h) = (sum_k a_k v_k) W_v,h + b_v,h  (sum_k a_k = 1)
            av = jnp.einsum("bkhq,bkd->bhqd", attn, v)
            out = jnp.einsum("bhqd,dhc->bqhc", av, wv_h) + bv.reshape(nh, head)
            return out.reshape(b, nq, internal) @ wo + bo
        if order == "fold_queries":
            kh = (k @ wk + bk).reshape(b, nk, nh, head)
            vh = (v @ wv + bv).reshape(b, nk, nh, head)
            # (q W_q,h + b_q,h) . k_h = q . (W_q,h k_h) + b_q,h . k_h
            wqk = jnp.einsum("dhc,bkhc->bdhk", wq_h, kh)
            logits = jnp.einsum("bqd,bdhk->bhqk", q, wqk)
            logits = logits + jnp.einsum("hc,bkhc->bhk", bq.reshape(nh, head), kh)[:, :, None]
            attn = softmax(logits / scale)
            # sum_h (a_h v_h) W_o,h = sum_h a_h (v_h W_o,h)
            vo = jnp.einsum("bkhc,hcd->bhkd", vh, wo_h)
            return jnp.einsum("bhqk,bhkd->bqd", attn, vo) + bo
        raise ValueError(f"unknown attention order {order!r}")


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
        layer0: Layer0Inputs | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        self_attn = Attention(self.num_heads, 1, self.dtype, name="self_attn")
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries, token_mask)
        queries = layer_norm(_DECODER_EPS, self.dtype, name="norm1")(queries)

        q = queries + query_pe
        if layer0 is None:
            k, v = keys + key_pe, keys
        else:  # the same inputs, their per-image part projected already
            k, v = layer0.input("t2i_k"), layer0.input("t2i_v")
        queries = queries + Attention(
            self.num_heads, self.downsample_rate, self.dtype, name="cross_attn_token_to_image"
        )(q, k, v)
        queries = layer_norm(_DECODER_EPS, self.dtype, name="norm2")(queries)

        queries = queries + MLPBlock(self.mlp_dim, "relu", self.dtype, name="mlp")(queries)
        queries = layer_norm(_DECODER_EPS, self.dtype, name="norm3")(queries)

        q = queries + query_pe
        k = keys + key_pe if layer0 is None else layer0.input("i2t_q")
        keys = keys + Attention(
            self.num_heads, self.downsample_rate, self.dtype, name="cross_attn_image_to_token"
        )(k, q, queries, token_mask)
        keys = layer_norm(_DECODER_EPS, self.dtype, name="norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """image (B, S, S, D), image_pe (B or 1, S, S, D), tokens (B, N, D), token_mask (B, N)
    -> (queries (B, N, D), keys (B, S*S, D)).

    `layer0` (optional): the image's per-image projections and the dense prompt's factors, for
    layer 0 (`layer0_image_projections`); `image` must then be their sum (embedding + dense).
    """

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
        layer0: Layer0Inputs | None = None,
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
            )(queries, keys, point_embedding, key_pe, token_mask, layer0 if i == 0 else None)
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
