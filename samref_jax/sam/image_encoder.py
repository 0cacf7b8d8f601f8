"""SAM's ViT image encoder: patch embedding, windowed/global attention blocks with decomposed
relative positions, and the neck to `prompt_embed_dim` channels.

x: (B, img_size, img_size, 3) normalised and padded -> (B, S, S, 256) with S = img_size / 16.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from samref_jax.sam.common import Dtype, MLPBlock, layer_norm
from samref_jax.sam.config import SamConfig

_ENCODER_EPS = 1e-6


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, window, window, C), zero-padding H, W up to a multiple.

    The padding is not masked in attention (as in SAM). Returns the padded (Hp, Wp) too.
    """
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)
    return x, (hp, wp)


def window_unpartition(
    windows: jax.Array, window: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> jax.Array:
    """Inverse of `window_partition`, cropping the padding: -> (B, H, W, C)."""
    hp, wp = pad_hw
    h, w = hw
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return x[:, :h, :w, :]


def relative_position_index(q_size: int, k_size: int) -> jax.Array:
    """Index into a (2 * max(q, k) - 1, C) table for every (query, key) pair: (q, k) int32.

    Equal sizes give `q - k + (size - 1)` (the only case in SAM at its native resolution).
    """
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    q_coords = jnp.arange(q_size, dtype=jnp.float32)[:, None] * q_ratio
    k_coords = jnp.arange(k_size, dtype=jnp.float32)[None, :] * k_ratio
    rel = (q_coords - k_coords) + (k_size - 1) * k_ratio
    return rel.astype(jnp.int32)


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative position bias (MViTv2 style).

    x: (B, H, W, D) -> (B, H, W, D). The bias uses the *unscaled* queries.
    """

    num_heads: int
    input_size: tuple[int, int]  # (H, W) of the token grid this block attends over.
    dtype: Dtype = jnp.float32
    # Queries per step of a loop over query rows (0: all at once). Each query's softmax row is
    # the same either way; the loop keeps the score block in cache on CPU.
    query_block: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, dim = x.shape
        head_dim = dim // self.num_heads
        scale = head_dim**-0.5
        rel_pos_h = self.param(
            "rel_pos_h", nn.initializers.zeros, (2 * self.input_size[0] - 1, head_dim), jnp.float32
        )
        rel_pos_w = self.param(
            "rel_pos_w", nn.initializers.zeros, (2 * self.input_size[1] - 1, head_dim), jnp.float32
        )
        qkv = nn.Dense(3 * dim, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, HW, hd)

        rh = rel_pos_h.astype(self.dtype)[relative_position_index(h, h)]  # (h, h, hd)
        rw = rel_pos_w.astype(self.dtype)[relative_position_index(w, w)]  # (w, w, hd)

        def attend(q_rows: jax.Array, rh_rows: jax.Array) -> jax.Array:
            """Queries of r whole grid rows: q_rows (B, n, r*w, hd), rh_rows (r, h, hd)."""
            r = rh_rows.shape[0]
            attn = jnp.einsum("bnqc,bnkc->bnqk", q_rows * scale, k)
            r_q = q_rows.reshape(b, self.num_heads, r, w, head_dim)
            rel_h = jnp.einsum("bnhwc,hkc->bnhwk", r_q, rh_rows)
            rel_w = jnp.einsum("bnhwc,wkc->bnhwk", r_q, rw)
            attn = attn.reshape(b, self.num_heads, r, w, h, w)
            attn = attn + rel_h[..., :, None] + rel_w[..., None, :]
            attn = attn.reshape(b, self.num_heads, r * w, h * w)
            # Softmax with its normalisation after the product with v: one division per
            # (query, channel) instead of per (query, key), and XLA:CPU no longer fuses the
            # division into the product. The same function up to float32 rounding (8% off the
            # vit_b encoder in an interleaved A/B on CPU).
            attn = attn.astype(jnp.float32)
            e = jnp.exp(attn - jnp.max(attn, axis=-1, keepdims=True))
            out = jnp.einsum("bnqk,bnkc->bnqc", e.astype(self.dtype), v)
            return (out.astype(jnp.float32) / jnp.sum(e, axis=-1, keepdims=True)).astype(self.dtype)

        rows = max(1, self.query_block // w)
        if self.query_block <= 0 or rows >= h or h % rows:
            out = attend(q, rh)
        else:
            blocks = h // rows
            q_blocks = q.reshape(b, self.num_heads, blocks, rows * w, head_dim)
            out = jax.lax.map(
                lambda a: attend(*a),
                (q_blocks.transpose(2, 0, 1, 3, 4), rh.reshape(blocks, rows, h, head_dim)),
            )  # (blocks, B, n, rows*w, hd)
            out = out.transpose(1, 2, 0, 3, 4)
        out = out.reshape(b, self.num_heads, h, w, head_dim).transpose(0, 2, 3, 1, 4)
        out = out.reshape(b, h, w, dim)
        return nn.Dense(dim, dtype=self.dtype, name="proj")(out)


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when `window_size > 0`, else global."""

    num_heads: int
    mlp_dim: int
    window_size: int
    input_size: tuple[int, int]
    dtype: Dtype = jnp.float32
    query_block: int = 0  # global attention only: see Attention.query_block

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = layer_norm(_ENCODER_EPS, self.dtype, name="norm1")(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            size = (self.window_size, self.window_size)
        else:
            size = self.input_size
        block = self.query_block if self.window_size == 0 else 0
        x = Attention(self.num_heads, size, self.dtype, block, name="attn")(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
        y = layer_norm(_ENCODER_EPS, self.dtype, name="norm2")(x)
        return x + MLPBlock(self.mlp_dim, "gelu", self.dtype, name="mlp")(y)


class ImageEncoderViT(nn.Module):
    """SAM's image encoder. x: (B, S*16, S*16, 3) float -> (B, S, S, prompt_embed_dim)."""

    config: SamConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        grid = cfg.image_embedding_size
        if x.shape[1:] != (cfg.img_size, cfg.img_size, 3):
            raise ValueError(
                f"image encoder expects (B, {cfg.img_size}, {cfg.img_size}, 3), got {x.shape}"
            )
        x = nn.Conv(
            cfg.encoder_embed_dim,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=self.dtype,
            name="patch_embed",
        )(x.astype(self.dtype))
        pos_embed = self.param(
            "pos_embed", nn.initializers.zeros, (1, grid, grid, cfg.encoder_embed_dim), jnp.float32
        )
        x = x + pos_embed.astype(self.dtype)
        query_block = cfg.global_attn_query_block
        if query_block < 0:
            query_block = 128 if jax.default_backend() == "cpu" else 0
        for i in range(cfg.encoder_depth):
            is_global = i in cfg.encoder_global_attn_indexes
            x = Block(
                num_heads=cfg.encoder_num_heads,
                mlp_dim=int(cfg.encoder_embed_dim * cfg.mlp_ratio),
                window_size=0 if is_global else cfg.window_size,
                input_size=(grid, grid),
                dtype=self.dtype,
                query_block=query_block,
                name=f"blocks_{i}",
            )(x)
        # Neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (no conv biases).
        x = nn.Conv(cfg.prompt_embed_dim, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0")(
            x
        )
        x = layer_norm(_ENCODER_EPS, self.dtype, name="neck_1")(x)
        x = nn.Conv(
            cfg.prompt_embed_dim,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=self.dtype,
            name="neck_2",
        )(x)
        return layer_norm(_ENCODER_EPS, self.dtype, name="neck_3")(x)
