"""The shared early-fusion "diff refiner" (docs/design.md, 'Diff refiner').

Input: image (3) + positive/negative click disks (2) + coarse logits S (1) + the previous
click's final logits (1, ``prev_mask_input``), concatenated,
then conv stem 3x3 stride 2 (width C) + norm + act -> ``blocks_before`` depthwise-separable
residual blocks -> add the image embedding projected 1x1 to C and bilinearly resized to the
stem resolution -> ``blocks_after`` blocks -> two 3x3 heads (detail D, error Err) bilinearly
upsampled to the input frame. Output logits ``G = D * sigmoid(Err) + S * (1 - sigmoid(Err))``.

With the default init (``detail_residual=True``: the detail head predicts ``D = S + d`` and
starts at zero) an untrained refiner returns exactly ``G = S``, so a refiner stage trained on a
frozen SAM starts from SAM's answer. With ``detail_residual=False`` (error bias -4, heads scaled
by ``head_init_scale``) it returns ``G ~= (1 - sigmoid(-4)) * S ~= 0.982 * S``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from samref_jax.refiners.conv import conv2d, depthwise_conv, pointwise_conv
from samref_jax.refiners.norm import group_norm, group_norm_act
from samref_jax.sam.common import KernelAndBias, gelu, resize_bilinear, resize_matrix

Array = jax.Array


class RefinerOutput(NamedTuple):
    """Refiner outputs, all (B, H, W) float32 at the resolution of the coarse logits.

    logits: blended logits G. detail: detail logits D. error_logits: Err (sigmoid = the
    predicted probability that S is wrong at that pixel).
    """

    logits: Array
    detail: Array
    error_logits: Array


class RefinerContext(NamedTuple):
    """What a refiner computes from the image and its embedding alone (no clicks, no logits):
    the same for every click on one image, so an interactive caller computes it once
    (``DiffRefiner(..., context_only=True)``) and passes it back with ``context=``.

    image: (B, h', w', 3) float32, the normalised image resized to the working size.
    embedding: (B, hs, ws, C) the image embedding projected by ``embed_proj`` and resized to
      the stem's grid, in the compute dtype.
    """

    image: Array
    embedding: Array


def default_refiner_config() -> ml_collections.ConfigDict:
    """Default DiffRefiner config (GlobalDiff uses it as is)."""
    return ml_collections.ConfigDict(
        dict(
            width=32,  # C, channels of the stem and blocks
            blocks_before=2,  # depthwise-separable blocks before the embedding is added
            blocks_after=2,  # blocks after
            kernel_size=3,  # depthwise kernel of the blocks
            stem_kernel=3,
            head_kernel=3,
            norm="group",  # "group" (GroupNorm) or "layer" (LayerNorm over channels)
            num_groups=8,  # GroupNorm groups (gcd with width is used)
            norm_eps=1e-5,
            act="gelu",  # "gelu" (exact), "relu", "silu"
            error_bias_init=-4.0,  # initial bias of the error head
            head_init_scale=0.01,  # heads' kernels = lecun_normal * this (0 -> zeros)
            # True: D = S + head(...), the detail head starting at zero (G = S at init);
            # False: D = head(...).
            detail_residual=True,
            coarse_input_scale=8.0,  # the network sees tanh(S / this) as the S channel
            # True: the previous click's final logits are an input channel (tanh(prev / scale)),
            # so the refined mask of round t is an input of round t + 1 (gradients included).
            prev_mask_input=True,
            # Internal square working size: inputs are bilinearly resized to it before the stem,
            # heads resized back to the frame. None: work at the input frame size.
            input_size=ml_collections.config_dict.placeholder(int),
            antialias=False,  # antialias when resizing inputs down (torch-like: False)
            dtype="float32",  # compute dtype ("bfloat16" for bf16); params stay float32
        )
    )


def _act(name: str):
    return {
        "gelu": gelu,  # exact (erf)
        "relu": nn.relu,
        "silu": nn.silu,
    }[name]


class GroupNorm(nn.Module):
    """GroupNorm over the channels of (B, H, W, C), statistics in float32 (``norm.group_norm``).

    Same parameters (``scale``, ``bias``: (C,)) and formula as ``nn.GroupNorm`` with its default
    fast variance (``E[x^2] - E[x]^2``); the statistics are per-channel sums over H, W grouped
    afterwards (XLA:CPU runs this about 8x faster than flax's reduction over a (B, H, W, G, C/G)
    view: 0.5 ms vs 4 ms at 128x128x32), and the backward pass is hand-written (two sweeps).
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, act: Any = None, skip: Array | None = None) -> Array:
        """GroupNorm(x); with ``act``, ``act(GroupNorm(x) + skip)`` (``skip`` optional, shaped
        as x) computed in float32 and rounded once (``norm.group_norm_act``)."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if act is None:
            if skip is not None:
                raise ValueError("skip is only added before an activation")
            return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)
        return group_norm_act(x, scale, bias, skip, self.num_groups, self.epsilon, self.dtype, act)


def _norm_act(cfg: Any, dtype: Any, name: str, x: Array, skip: Array | None = None) -> Array:
    """``act(norm(x) + skip)`` of the config's norm and activation (``skip`` optional)."""
    act = _act(cfg.act)
    if cfg.norm == "group":
        groups = math.gcd(int(cfg.num_groups), int(cfg.width))
        return GroupNorm(num_groups=groups, epsilon=cfg.norm_eps, dtype=dtype, name=name)(
            x, act, skip
        )
    if cfg.norm == "layer":
        y = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, name=name)(x)
        return act(y if skip is None else skip + y)
    raise ValueError(f"unknown norm {cfg.norm!r}")


def _resize(x: Array, hw: tuple[int, int], antialias: bool = False) -> Array:
    """Bilinear (half-pixel, like torch align_corners=False) resize of (B, h, w, C) to hw.

    Without antialias this gathers two neighbours per axis (O(output) work); with antialias it
    uses `jax.image.resize`, which builds dense resampling matrices (slow at 1024 px).
    """
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    if not antialias:
        return resize_bilinear(x, (int(hw[0]), int(hw[1])), axes=(1, 2))
    shape = (x.shape[0], hw[0], hw[1], x.shape[3])
    return jax.image.resize(x, shape, method="bilinear", antialias=antialias)


class DepthwiseConv(nn.Module):
    """Depthwise k x k convolution, SAME padding, as k*k shifted multiply-adds.

    Same parameters and result as `nn.Conv(c, (k, k), padding="SAME", feature_group_count=c)`
    (kernel (k, k, 1, C), bias (C,)), but XLA fuses it into one elementwise loop: on CPU this is
    ~20x faster than XLA's grouped convolution. Backward pass: :func:`conv.depthwise_conv`'s
    (float32 parameter gradients). x: (B, H, W, C) -> (B, H, W, C).
    """

    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        c = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return depthwise_conv(x, kernel.reshape(k, k, c), bias, jnp.dtype(self.dtype))


class PointwiseConv(nn.Module):
    """1x1 convolution as a matrix product over channels: (B, H, W, Cin) -> (B, H, W, Cout).

    Same parameters as ``nn.Conv(features, (1, 1))`` (kernel (1, 1, Cin, Cout), bias (Cout,)),
    so checkpoints are interchangeable; XLA:CPU runs the dot 2-4x faster than its convolution.
    Backward pass: :func:`conv.pointwise_conv`'s (float32 parameter gradients).
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1, 1, cin, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return pointwise_conv(x, kernel[0, 0], bias, jnp.dtype(self.dtype))


class SepBlock(nn.Module):
    """Residual depthwise-separable block: dw kxk -> norm -> act -> 1x1 -> norm, + skip, act."""

    cfg: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, k = x.shape[-1], self.cfg.kernel_size
        y = DepthwiseConv(k, self.dtype, name="dw")(x)
        y = _norm_act(self.cfg, self.dtype, "norm1", y)
        y = PointwiseConv(c, self.dtype, name="pw")(y)
        return _norm_act(self.cfg, self.dtype, "norm2", y, skip=x)


class DiffRefiner(nn.Module):
    """Early-fusion refiner.

    Attributes:
      cfg: see :func:`default_refiner_config`.
    """

    cfg: Any
    dtype: Any = None  # compute dtype; None: ``cfg.dtype``

    @property
    def work_size(self) -> int | None:
        return None if self.cfg.input_size is None else int(self.cfg.input_size)

    @nn.compact
    def __call__(
        self,
        image: Array | None,
        disks: Array | None,
        coarse_logits: Array | None,
        embedding: Array | None,
        context: RefinerContext | None = None,
        context_only: bool = False,
        prev_logits: Array | None = None,
    ) -> RefinerOutput | RefinerContext:
        """Refine coarse logits.

        Args:
          image: (B, H, W, 3) normalised image (unused when ``context`` is given).
          disks: (B, h', w', 2) click disk maps (positive, negative); any size, resized to the
            working size if needed (draw them at the working size to avoid that).
          coarse_logits: (B, H, W) coarse logits S (e.g. SAM's, upsampled to the frame).
          embedding: (B, h, w, E) image embedding of any size (e.g. SAM's 64x64x256; unused
            when ``context`` is given).
          context: the :class:`RefinerContext` of this image and these parameters, or None to
            compute it here (the same numbers).
          context_only: return the :class:`RefinerContext` of ``image`` and ``embedding``
            (``disks`` and ``coarse_logits`` may be None).
          prev_logits: (B, H, W) the previous click's final logits (a negative constant before
            the first click); required iff ``cfg.prev_mask_input``.

        Returns:
          RefinerOutput, each (B, H, W) float32 (or the RefinerContext with ``context_only``).
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype if self.dtype is None else self.dtype)
        h, w = (image if context_only else coarse_logits).shape[1:3]
        work = (h, w) if self.work_size is None else (self.work_size, self.work_size)
        k = cfg.stem_kernel
        pad = (k - 1) // 2
        stem_hw = tuple((n + 2 * pad - k) // 2 + 1 for n in work)
        if context is None:
            e = PointwiseConv(cfg.width, dtype, name="embed_proj")(embedding.astype(dtype))
            context = RefinerContext(
                image=_resize(image.astype(jnp.float32), work, cfg.antialias),
                embedding=_resize(e, stem_hw).astype(dtype),
            )
        if context_only:
            return context
        s = coarse_logits.astype(jnp.float32)

        s_in = jnp.tanh(s / cfg.coarse_input_scale)[..., None]
        channels = [
            context.image,
            _resize(disks.astype(jnp.float32), work, cfg.antialias),
            _resize(s_in, work, cfg.antialias),
        ]
        if cfg.get("prev_mask_input", False):
            if prev_logits is None:
                raise ValueError("this refiner takes the previous logits (prev_mask_input)")
            prev_in = jnp.tanh(prev_logits.astype(jnp.float32) / cfg.coarse_input_scale)
            channels.append(_resize(prev_in[..., None], work, cfg.antialias))
        x = jnp.concatenate(channels, axis=-1).astype(dtype)

        # nn.Conv(width, (k, k), strides=2, padding=pad)'s parameters, hand-written backward.
        ks, bs = KernelAndBias((k, k, x.shape[-1], cfg.width), name="stem")()
        x = conv2d(x, ks, bs, 2, dtype, pad=(pad, pad))
        x = _norm_act(cfg, dtype, "stem_norm", x)
        for i in range(cfg.blocks_before):
            x = SepBlock(cfg, dtype, name=f"block_{i}")(x)

        if tuple(x.shape[1:3]) != stem_hw:  # static shapes; a config error, not data
            raise ValueError(f"stem grid {x.shape[1:3]} != expected {stem_hw}")
        x = x + context.embedding
        for i in range(cfg.blocks_after):
            x = SepBlock(cfg, dtype, name=f"block_{cfg.blocks_before + i}")(x)

        hk = cfg.head_kernel
        if cfg.head_init_scale > 0:
            kinit = nn.initializers.variance_scaling(
                float(cfg.head_init_scale) ** 2, "fan_in", "truncated_normal"
            )
        else:
            kinit = nn.initializers.zeros
        # The two heads run as one 2-channel convolution (their parameters stay separate).
        dinit = nn.initializers.zeros if cfg.detail_residual else kinit
        kd, bd = KernelAndBias(
            (hk, hk, x.shape[-1], 1), dinit, nn.initializers.zeros, name="detail_head"
        )()
        ke, be = KernelAndBias(
            (hk, hk, x.shape[-1], 1),
            kinit,
            nn.initializers.constant(cfg.error_bias_init),
            name="error_head",
        )()
        heads = conv2d(
            x, jnp.concatenate([kd, ke], -1), jnp.concatenate([bd, be]), 1, dtype, jnp.float32
        )
        # The heads' biases are added in float32: their gradients sum over every pixel, which
        # a bf16 sum would round badly (2-4x off in a bf16 step; tested).
        # Columns first, as a product with the (w, w') resize matrix, one (B, h', w) plane per
        # head: a dot's output is materialised, so the row gathers that follow move contiguous
        # rows and fuse into the blend. (Two gathers in one fusion made XLA:CPU recompute the
        # column pass for every frame pixel: 7.3 ms instead of about 1.5 ms at 1024.)
        cols = jnp.einsum(
            "bhuk,wu->kbhw",
            heads.astype(jnp.float32),
            jnp.asarray(resize_matrix(heads.shape[2], w)),
            precision=jax.lax.Precision.HIGHEST,
        )
        d, err = resize_bilinear(cols[0], (h, w)), resize_bilinear(cols[1], (h, w))
        p = jax.nn.sigmoid(err)
        if cfg.detail_residual:  # G = S + d * p: exactly S while the detail head is zero
            g = s + d * p
            d = s + d
        else:
            g = d * p + s * (1.0 - p)
        return RefinerOutput(logits=g, detail=d, error_logits=err)
