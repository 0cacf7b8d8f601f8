"""SAM-REF: SAM's decoder, then GlobalDiff, then PatchDiff, one pure function per click.

The data path of one click, all in the padded input frame (F x F, F = 1024 for vit_b):

  image embedding E (B, 64, 64, 256), computed once per image (late fusion, cheap clicks)
    -> SAM prompt encoder + mask decoder on all clicks so far, the previous click's
       `mask_input` (see below)                          -> low-res logits (B, 256, 256)
    -> upscale to the frame                              -> S (B, F, F)
    -> GlobalDiff(image, click disks, S, previous F, E)   -> G (B, F, F)
    -> PatchDiff(window from prev F vs G around the last click, crop, refine, paste)
                                                         -> F (B, F, F); mask = F > 0

State: an image's :class:`ImageContext` (``SamRef.prepare``, once per image) and a
:class:`ClickState` (the clicks so far and the last click's feedback)::

  ctx = model.apply(v, frame, valid_hw, radius, method=SamRef.prepare)
  state = ClickState.empty(cfg)
  state = state.add_click(xy, label)                # (B, 2) frame pixels, (B,) 1/0
  out, state = model.apply(v, ctx, state, "full", method=SamRef.click)

Other prompts: ``state.add_box(box)`` (a box in two slots, SAM's labels 2/3; the refiners draw
no disks for it, PatchDiff's window follows its centre while it is the last prompt) and
``state.with_mask(logits)`` (a mask to correct, as the feedback before the first click).

Feedback (one rule, ``ClickState.feed_back`` with :func:`next_mask_input`, used by training,
the predictor, the evaluator and the demo): the final logits F of click t are the refiners'
previous-mask input at click t + 1, and with ``feedback="refined"`` SAM's next ``mask_input``
is its own low-res logits plus the refiners' correction ``F - S`` average-pooled to the low-res
grid (with ``"sam"``: SAM's own low-res logits). Both paths are differentiable, so a loss at
click t + 1 reaches the refiners of click t. Untrained refiners return S exactly, so either
rule then reproduces SAM.

`mode` chooses how far the path runs: "sam" (refiners off, the baseline), "global", "full".
Parameters: {"sam": ..., "global_diff": ..., "patch_diff": ...}.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from samref_jax.refiners.global_diff import GlobalDiff
from samref_jax.refiners.patch_diff import PatchDiff
from samref_jax.refiners.refiner import RefinerContext
from samref_jax.sam.model import Sam
from samref_jax.sam.transforms import upscale_to_frame
from samref_jax.samref.config import MODES, sam_config_from

Array = jax.Array


class ImageContext(NamedTuple):
    """One image's inputs, the same for every click (B = batch; F = frame side).

    embedding: (B, S, S, D) SAM image embedding (computed once per image).
    image: (B, F, F, 3) normalised, zero-padded frame.
    valid_hw: (B, 2) int32 unpadded image size in the frame.
    radius: (B,) float32 click-disk radius in frame pixels.
    detail_image: (B, kF, kF, 3) the image normalised at k = ``refiners.patch_diff.image_scale``
      times the frame, PatchDiff's image source (None when k = 1).
    image_pe / global_context / decoder_layer0: optional per-image caches an interactive caller
      computes once (:meth:`SamRef.prepare` with ``caches=True``): SAM's dense positional
      encoding (1, S, S, D), GlobalDiff's :class:`RefinerContext`, and the per-image part of
      SAM's decoder's first layer. None: each click computes them.
    """

    embedding: Array
    image: Array
    valid_hw: Array
    radius: Array
    detail_image: Array | None = None
    image_pe: Array | None = None
    global_context: RefinerContext | None = None
    decoder_layer0: dict[str, Array] | None = None

    @classmethod
    def blank(cls, config: ml_collections.ConfigDict, batch: int = 1) -> ImageContext:
        """Zeros of the right shapes (initialisation, shape checks)."""
        sc = sam_config_from(config)
        f, s, b = sc.img_size, sc.image_embedding_size, int(batch)
        k = detail_scale(config)
        return cls(
            embedding=jnp.zeros((b, s, s, sc.prompt_embed_dim)),
            image=jnp.zeros((b, f, f, 3)),
            valid_hw=jnp.full((b, 2), f, jnp.int32),
            radius=jnp.ones((b,), jnp.float32),
            detail_image=jnp.zeros((b, k * f, k * f, 3)) if k > 1 else None,
        )


class ClickState(NamedTuple):
    """The click loop's state: every click so far and what the last click feeds back.

    coords: (B, N, 2) float32 click (x, y) in frame pixels; labels: (B, N) int32 1/0, -1 on the
      free slots (N = ``max_clicks``, static, so a jitted step never retraces); a box prompt
      (:meth:`add_box`) fills two slots, its corners with labels 2 and 3 (SAM's box encoding).
    num_clicks: (B,) int32 slots used so far (the last is ``coords[num_clicks - 1]``).
    prev_low_res: (B, 4S, 4S) SAM's next ``mask_input``; has_prev: (B,) bool.
    prev_logits: (B, F, F) the last click's final logits (a negative constant before any click).

    The loop: ``state = ClickState.empty(cfg)``, then per click
    ``state = state.add_click(xy, label)`` and ``outputs, state = SamRef.click(ctx, state,
    mode)``. The returned state carries the feedback of :meth:`feed_back`, the one rule of
    training, the predictor, the evaluator and the demo.
    """

    coords: Array
    labels: Array
    num_clicks: Array
    prev_low_res: Array
    has_prev: Array
    prev_logits: Array

    @classmethod
    def empty(cls, config: ml_collections.ConfigDict, batch: int = 1) -> ClickState:
        """No click yet. ``config``: the SAM-REF model config (``max_clicks``,
        ``first_prev_logit`` and SAM's sizes)."""
        sc = sam_config_from(config)
        f, lr, b = sc.img_size, sc.low_res_mask_size, int(batch)
        n = int(config.max_clicks)
        return cls(
            coords=jnp.zeros((b, n, 2), jnp.float32),
            labels=jnp.full((b, n), -1, jnp.int32),
            num_clicks=jnp.zeros((b,), jnp.int32),
            prev_low_res=jnp.zeros((b, lr, lr), jnp.float32),
            has_prev=jnp.zeros((b,), bool),
            prev_logits=jnp.full((b, f, f), float(config.first_prev_logit), jnp.float32),
        )

    def add_click(self, xy: Array, label: Array) -> ClickState:
        """This state with one more click per sample (jittable, static shapes).

        Args:
          xy: (B, 2) click (x, y) in frame pixels; label: (B,) 1 positive, 0 negative.

        Returns:
          The state with the click in slot ``num_clicks`` (a full state comes back unchanged:
          no slot left). Elementwise, so a batch sharded over devices needs no collective.
        """
        n = self.labels.shape[1]
        put = jnp.arange(n)[None, :] == self.num_clicks[:, None]  # (B, N); all False when full
        xy = jnp.asarray(xy, jnp.float32)
        label = jnp.asarray(label).astype(jnp.int32)
        return self._replace(
            coords=jnp.where(put[..., None], xy[:, None, :], self.coords),
            labels=jnp.where(put, label[:, None], self.labels),
            num_clicks=jnp.minimum(self.num_clicks + 1, n),
        )

    def add_box(self, box: Array) -> ClickState:
        """This state with a box prompt per sample (jittable, static shapes).

        Args:
          box: (B, 4) float (x0, y0, x1, y1) in frame pixels (SAM's box convention: the corners'
            coordinates as SAM's predictor scales them, no pixel-centre shift).

        Returns:
          The state with the box's corners in slots ``num_clicks`` and ``num_clicks + 1``
          (labels 2 top-left, 3 bottom-right); a state with fewer than two free slots comes
          back unchanged. SAM takes one box per prompt: add it once (the predictor replaces
          it rather than adding a second). The refiners draw no disks for box corners
          (``refiners.clicks``); PatchDiff's window follows the box centre while the box is
          the last prompt (:meth:`SamRef.click`).
        """
        n = self.labels.shape[1]
        corners = jnp.asarray(box, jnp.float32).reshape(-1, 2, 2)  # (B, 2, 2): (x0, y0), (x1, y1)
        k = self.num_clicks[:, None]
        fits = k + 2 <= n  # (B, 1)
        slot = jnp.arange(n)[None, :]
        put0, put1 = fits & (slot == k), fits & (slot == k + 1)  # (B, N)
        coords = jnp.where(put0[..., None], corners[:, None, 0], self.coords)
        coords = jnp.where(put1[..., None], corners[:, None, 1], coords)
        labels = jnp.where(put0, 2, jnp.where(put1, 3, self.labels)).astype(jnp.int32)
        return self._replace(
            coords=coords,
            labels=labels,
            num_clicks=jnp.where(fits[:, 0], self.num_clicks + 2, self.num_clicks),
        )

    def with_mask(self, logits: Array) -> ClickState:
        """This state with a mask to correct as the previous round's answer (jittable).

        Args:
          logits: (B, F, F) frame logits of the mask (the predictor uses +/-
            ``-first_prev_logit``, i.e. +/-20: positive inside, negative outside and on the
            padding; ``samref.prompts.mask_to_frame_logits``).

        Returns:
          The state whose feedback is that mask, as if a round had returned it: ``prev_logits``
          = ``logits`` (the refiners' previous mask), ``prev_logits`` average-pooled to SAM's
          low-res grid as ``prev_low_res`` (SAM's ``mask_input``), ``has_prev`` True. Shapes and
          dtypes equal :meth:`empty`'s, so the jitted step does not retrace.
        """
        b, f = self.prev_logits.shape[:2]
        logits = jnp.asarray(logits, jnp.float32)
        if logits.shape != self.prev_logits.shape:
            raise ValueError(f"mask logits must be {self.prev_logits.shape}, got {logits.shape}")
        lr = self.prev_low_res.shape[-1]
        k = f // lr
        low = jnp.mean(logits.reshape(b, lr, k, lr, k), axis=(2, 4))
        return self._replace(prev_low_res=low, prev_logits=logits, has_prev=jnp.ones((b,), bool))

    def with_clicks(self, coords: Any, labels: Any) -> ClickState:
        """This state with its clicks replaced by the ``k`` given (host side; the feedback
        fields are kept).

        Args:
          coords: ``(B, k, 2)`` (or ``(k, 2)`` for B = 1) click ``(x, y)`` in frame pixels.
          labels: ``(B, k)`` (or ``(k,)``) 1 positive, 0 negative; ``1 <= k <= N``.
        """
        b, n = self.labels.shape
        coords = np.asarray(coords, np.float32).reshape(b, -1, 2)
        labels = np.asarray(labels, np.int32).reshape(b, -1)
        k = coords.shape[1]
        if labels.shape[1] != k or not 1 <= k <= n:
            raise ValueError(f"need 1..{n} clicks, one label each; got {k} and {labels.shape[1]}")
        c = np.zeros((b, n, 2), np.float32)
        lab = np.full((b, n), -1, np.int32)
        c[:, :k], lab[:, :k] = coords, labels
        return self._replace(
            coords=jnp.asarray(c),
            labels=jnp.asarray(lab),
            num_clicks=jnp.full((b,), k, jnp.int32),
        )

    def feed_back(self, outputs: ClickOutputs) -> ClickState:
        """The feedback rule: this click's final logits become the refiners' previous mask, and
        ``outputs.mask_input`` (:func:`next_mask_input`) SAM's next ``mask_input``."""
        b = self.labels.shape[0]
        return self._replace(
            prev_low_res=outputs.mask_input.astype(jnp.float32),
            prev_logits=outputs.final_logits.astype(jnp.float32),
            has_prev=jnp.ones((b,), bool),
        )


class ClickOutputs(NamedTuple):
    """Outputs of one click step.

    low_res: (B, 4S, 4S) chosen SAM low-res logits (feed back as `prev_low_res`).
    sam_logits: (B, F, F) S; global_logits: (B, F, F) G; final_logits: (B, F, F) F.
    score: (B,) SAM's predicted IoU of the chosen mask.
    window: (B, 4) PatchDiff window (x0, y0, x1, y1) in frame pixel edges (zeros unless "full").
    global_error_logits: (B, F, F) GlobalDiff error head (zeros in "sam" mode).
    patch: PatchDiffOutput or None (only in "full" mode), for patch losses.
    mask_input: (B, 4S, 4S) SAM's mask input for the next click (:func:`next_mask_input`;
      ``ClickState.feed_back`` feeds it back).
    """

    low_res: Array
    sam_logits: Array
    global_logits: Array
    final_logits: Array
    score: Array
    window: Array
    global_error_logits: Array
    patch: Any
    mask_input: Array


class SamRef(nn.Module):
    """SAM + GlobalDiff + PatchDiff. `config`: a FrozenConfigDict from `samref_model_config`;
    `mask_cond`: see `PromptEncoder` (the training step sets False: per-row select)."""

    config: ml_collections.FrozenConfigDict
    dtype: Any = jnp.float32
    mask_cond: bool = True

    def setup(self) -> None:
        self.sam_config = sam_config_from(self.config)
        self.sam = Sam(self.sam_config, self.dtype, self.mask_cond)
        # The refiners compute in the model's dtype when it is lower than float32 (bf16
        # training); otherwise in their configs' dtype. Parameters stay float32.
        rdt = None if jnp.dtype(self.dtype) == jnp.float32 else self.dtype
        self.global_diff = GlobalDiff(self.config.refiners.global_diff, rdt)
        self.patch_diff = PatchDiff(self.config.refiners.patch_diff, rdt)

    def __call__(
        self, ctx: ImageContext, state: ClickState, mode: str = "full"
    ) -> tuple[ClickOutputs, ClickState]:
        """Init entry point: one full click (creates every parameter)."""
        self.sam.embed_image(jnp.zeros((1,) + (self.sam_config.img_size,) * 2 + (3,)))
        return self.click(ctx, state, mode)

    def embed_image(self, images: Array) -> Array:
        """(B, F, F, 3) preprocessed -> (B, S, S, D)."""
        return self.sam.embed_image(images)

    def dense_pe(self) -> Array:
        """(1, S, S, D) SAM's dense positional encoding, for ``ImageContext.image_pe``."""
        return self.sam.dense_pe()

    def global_context(self, image: Array, embedding: Array) -> RefinerContext:
        """GlobalDiff's per-image inputs, for ``ImageContext.global_context``: image (B, F, F, 3)
        preprocessed, embedding (B, S, S, D) -> RefinerContext (the same numbers the step
        computes when it is not given)."""
        return self.global_diff(image, None, None, None, embedding, None, context_only=True)

    def decoder_layer0(self, embedding: Array, image_pe: Array | None = None) -> dict[str, Array]:
        """Per-image part of SAM's decoder's first layer, for ``ImageContext.decoder_layer0``:
        embedding (B, S, S, D) -> dict of (B, S*S, D / 2) arrays, transposed for the token-to-image
        keys and values (``Sam.layer0_projections``)."""
        return self.sam.layer0_projections(embedding, image_pe)

    def prepare(
        self,
        image: Array,
        valid_hw: Array,
        radius: Array,
        embedding: Array | None = None,
        caches: bool = True,
        detail_image: Array | None = None,
    ) -> ImageContext:
        """One image's :class:`ImageContext`: the per-image work, done once before its clicks.

        Args:
          image: (B, F, F, 3) normalised, zero-padded frame.
          valid_hw: (B, 2) int32 unpadded size in the frame; radius: (B,) click-disk radius in
            frame pixels.
          embedding: (B, S, S, D) SAM's embedding if already known (cached); None: computed.
          caches: also compute the per-image caches (positional encoding, GlobalDiff's inputs,
            the decoder's first-layer projections); False leaves them to each click.
          detail_image: (B, kF, kF, 3) the image at ``image_scale`` k x the frame (k > 1 only).
        """
        if embedding is None:
            embedding = self.embed_image(image)
        radius = jnp.asarray(radius, jnp.float32)
        ctx = ImageContext(embedding, image, valid_hw, radius, detail_image)
        if not caches:
            return ctx
        image_pe = self.dense_pe()
        return ctx._replace(
            image_pe=image_pe,
            global_context=self.global_context(image, embedding),
            decoder_layer0=self.decoder_layer0(embedding, image_pe),
        )

    def click(
        self, ctx: ImageContext, state: ClickState, mode: str = "full"
    ) -> tuple[ClickOutputs, ClickState]:
        """One interaction round on the clicks of ``state`` (its last click is the new one).

        Args:
          ctx: the image's :class:`ImageContext`; state: the clicks so far and the previous
            click's feedback (:class:`ClickState`); mode: static, "sam", "global" or "full".

        Returns:
          (outputs, next state): the next state is ``state.feed_back(outputs)``, to which the
          next click is added.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        out = self._round(ctx, state, mode)
        return out, state.feed_back(out)

    def _round(self, ctx: ImageContext, x: ClickState, mode: str) -> ClickOutputs:
        b = x.coords.shape[0]
        masks, iou = self.sam.predict_masks(
            ctx.embedding,
            x.coords,
            x.labels,
            x.prev_low_res,
            x.has_prev,
            ctx.image_pe,
            ctx.decoder_layer0,
        )
        # Click 1: SAM's best multimask output by predicted IoU; later: the single-mask token.
        # A box (two slots) or a mask to correct (has_prev before any click) is not ambiguous:
        # the single-mask token there too.
        best_multi = 1 + jnp.argmax(iou[:, 1:], axis=-1)
        use_multi = (x.num_clicks <= 1) & ~x.has_prev & bool(self.config.multimask_first_click)
        idx = jnp.where(use_multi, best_multi, 0)
        low_res = jnp.take_along_axis(masks, idx[:, None, None, None], axis=1)[:, 0]
        score = jnp.take_along_axis(iou, idx[:, None], axis=1)[:, 0]
        sam_logits = upscale_to_frame(low_res, self.sam_config)
        zeros = jnp.zeros_like(sam_logits)
        window = jnp.zeros((b, 4), jnp.float32)
        if mode == "sam":
            return ClickOutputs(
                low_res, sam_logits, sam_logits, sam_logits, score, window, zeros, None, low_res
            )
        g = self.global_diff(
            ctx.image,
            x.coords,
            x.labels,
            sam_logits,
            ctx.embedding,
            ctx.radius,
            ctx.global_context,
            prev_logits=x.prev_logits,
        )
        fb = str(self.config.get("feedback", "sam"))
        if mode == "global":
            nxt = next_mask_input(low_res, sam_logits, g.logits, fb)
            return ClickOutputs(
                low_res, sam_logits, g.logits, g.logits, score, window, g.error_logits, None, nxt
            )
        last = jnp.clip(x.num_clicks - 1, 0, x.coords.shape[1] - 1)
        last_xy = jnp.take_along_axis(x.coords, last[:, None, None], axis=1)[:, 0]
        # A box as the last prompt (its bottom-right corner, label 3, in the last slot): the
        # window follows the box centre; from the next click on, that click as usual.
        corner = jnp.take_along_axis(x.coords, jnp.maximum(last - 1, 0)[:, None, None], axis=1)
        box_last = jnp.take_along_axis(x.labels, last[:, None], axis=1) == 3  # (B, 1)
        last_xy = jnp.where(box_last, 0.5 * (last_xy + corner[:, 0]), last_xy)
        p = self.patch_diff(
            ctx.image,
            x.coords,
            x.labels,
            g.logits,
            x.prev_logits,
            ctx.embedding,
            ctx.radius,
            last_xy,
            ctx.valid_hw,
            ctx.detail_image,
        )
        nxt = next_mask_input(low_res, sam_logits, p.logits, fb)
        return ClickOutputs(
            low_res, sam_logits, g.logits, p.logits, score, p.window, g.error_logits, p, nxt
        )


def detail_scale(config: ml_collections.ConfigDict) -> int:
    """k: PatchDiff crops its image patch from a copy at k x the frame (1: the frame)."""
    return int(config.refiners.patch_diff.get("image_scale", 1))


def next_mask_input(low_res: Array, sam_logits: Array, final_logits: Array, feedback: str) -> Array:
    """SAM's ``mask_input`` for the next click (the feedback rule of the module docstring).

    Args:
      low_res: (B, L, L) SAM's chosen low-res logits of this click (L = 4S).
      sam_logits: (B, F, F) the same upscaled to the frame (S); final_logits: (B, F, F) F.
      feedback: "refined" (SAM's logits plus the refiners' correction pooled to L x L) or
        "sam" (SAM's own low-res logits).

    Returns:
      (B, L, L) float32. Differentiable in ``final_logits``; equal to ``low_res`` when F == S.
    """
    if feedback == "sam":
        return low_res
    if feedback != "refined":
        raise ValueError(f"feedback must be 'refined' or 'sam', got {feedback!r}")
    b, f, _ = final_logits.shape
    lr = low_res.shape[-1]
    if f % lr:
        raise ValueError(f"frame {f} is not a multiple of the low-res grid {lr}")
    k = f // lr
    delta = (final_logits.astype(jnp.float32) - sam_logits.astype(jnp.float32)).reshape(
        b, lr, k, lr, k
    )
    return low_res.astype(jnp.float32) + jnp.mean(delta, axis=(2, 4))


def init_samref_params(
    config: ml_collections.ConfigDict, rng: Array, sam_params: Any | None = None
) -> dict[str, Any]:
    """Random SAM-REF params (small: 1 sample). `sam_params` replaces the SAM subtree."""
    model = SamRef(ml_collections.FrozenConfigDict(config))
    ctx = ImageContext.blank(config)
    x = ClickState.empty(config).add_click(jnp.zeros((1, 2)), jnp.ones((1,)))
    if sam_params is None:
        params = jax.jit(lambda r: model.init(r, ctx, x, "full")["params"])(rng)
    else:
        # Initialise only the refiners; SAM params are given (avoids a 90M-param random init).
        shapes = jax.eval_shape(lambda: model.init(rng, ctx, x, "full"))["params"]
        params = {"sam": sam_params}
        for name in ("global_diff", "patch_diff"):
            params[name] = _init_refiner(model, name, ctx, x, rng, shapes[name])
    return dict(params)


def _init_refiner(
    model: SamRef, name: str, ctx: ImageContext, x: ClickState, rng: Array, shapes: Any
) -> Any:
    """Initialises one refiner's params with SAM stubbed by zeros (shapes only matter)."""
    rngs = jax.random.split(rng, 2)
    sc = sam_config_from(model.config)
    f = sc.img_size
    z = jnp.zeros((1, f, f))
    if name == "global_diff":
        mod = GlobalDiff(model.config.refiners.global_diff)
        p = jax.jit(
            lambda r: mod.init(
                r, ctx.image, x.coords, x.labels, z, ctx.embedding, ctx.radius, prev_logits=z - 20.0
            )["params"]
        )(rngs[0])
    else:
        mod = PatchDiff(model.config.refiners.patch_diff)
        p = jax.jit(
            lambda r: mod.init(
                r,
                ctx.image,
                x.coords,
                x.labels,
                z,
                z - 20.0,
                ctx.embedding,
                ctx.radius,
                x.coords[:, 0],
                ctx.valid_hw,
                ctx.detail_image,
            )["params"]
        )(rngs[1])
    chex_equal = jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(shapes)
    if not chex_equal:
        raise AssertionError(f"refiner {name} parameter tree differs from the SamRef tree")
    return p
