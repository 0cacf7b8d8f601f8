"""Per-round training losses: segmentation loss on S / G / F, error-head BCE, a
boundary-weighted patch loss, and SAM's IoU-head regression (docs/design.md, 'Training losses').

All functions work on a batch and return per-sample values ``(B,)`` so that a data-parallel
mean over the batch is the only cross-sample reduction (a sharded step then equals the
single-device step up to float reduction order). ``valid`` is ``bool[B, H, W]``: False on padding
and on ignore pixels (gt == -1); those pixels never contribute.

Example:
  >>> import jax.numpy as jnp
  >>> z = jnp.zeros((2, 8, 8)); gt = jnp.ones((2, 8, 8), bool); v = jnp.ones((2, 8, 8), bool)
  >>> normalized_focal_loss(z, gt, v).shape
  (2,)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from samref_jax.refiners.window import crop_patches

Array = jax.Array
_EPS = 1e-6


def default_loss_config() -> ml_collections.ConfigDict:
    """Loss weights and kinds (one config block, ``config.loss``)."""
    return ml_collections.ConfigDict(
        dict(
            seg="nfl",  # "nfl" (RITM normalised focal loss) or "bce_dice"
            focal_alpha=0.5,
            focal_gamma=2.0,
            dice_weight=1.0,  # bce_dice only: loss = BCE + dice_weight * Dice
            sam_weight=1.0,  # on S (SAM's upscaled logits); the only term in "sam" mode
            global_weight=1.0,  # on G
            final_weight=1.0,  # on F
            error_weight=0.5,  # BCE of GlobalDiff's error head vs (S > 0) XOR GT
            patch_weight=1.0,  # boundary-weighted BCE of PatchDiff's patch logits
            patch_boundary_weight=4.0,  # extra weight on the GT boundary band in the patch
            patch_boundary_radius=2,  # half-width (patch pixels) of the boundary band
            iou_weight=0.1,  # MSE of SAM's predicted IoU of the chosen mask vs its true IoU
            # Weight of round t (t = 0 .. T-1); shorter than T: the last entry repeats.
            round_weights=(1.0,),
        )
    )


def _mean_valid(x: Array, valid: Array) -> Array:
    v = valid.astype(jnp.float32)
    axes = tuple(range(1, x.ndim))
    return jnp.sum(x * v, axis=axes) / (jnp.sum(v, axis=axes) + _EPS)


def bce(logits: Array, target: Array, valid: Array, weight: Array | None = None) -> Array:
    """Mean (weighted) binary cross-entropy over valid pixels, per sample ``(B,)``."""
    logits = logits.astype(jnp.float32)
    t = target.astype(jnp.float32)
    loss = -(t * jax.nn.log_sigmoid(logits) + (1.0 - t) * jax.nn.log_sigmoid(-logits))
    if weight is None:
        return _mean_valid(loss, valid)
    w = weight * valid.astype(jnp.float32)
    axes = tuple(range(1, loss.ndim))
    return jnp.sum(loss * w, axis=axes) / (jnp.sum(w, axis=axes) + _EPS)


def dice(logits: Array, target: Array, valid: Array) -> Array:
    """Soft Dice loss over valid pixels, per sample."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32)) * valid
    t = target.astype(jnp.float32) * valid
    axes = tuple(range(1, p.ndim))
    inter = jnp.sum(p * t, axis=axes)
    return 1.0 - (2.0 * inter + 1.0) / (jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes) + 1.0)


def normalized_focal_loss(
    logits: Array, target: Array, valid: Array, alpha: float = 0.5, gamma: float = 2.0
) -> Array:
    """RITM's normalised focal loss, per sample.

    ``beta = (1 - p_t)^gamma`` rescaled (without gradient) so that it sums to the number of valid
    pixels; ``loss = mean_valid(-alpha_t * beta * log p_t)``.
    """
    z = logits.astype(jnp.float32)
    t = target.astype(bool)
    v = valid.astype(jnp.float32)
    p = jax.nn.sigmoid(z)
    pt = jnp.where(t, p, 1.0 - p)
    log_pt = jnp.where(t, jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z))
    alpha_t = jnp.where(t, alpha, 1.0 - alpha)
    beta = (1.0 - pt) ** gamma * v
    axes = tuple(range(1, z.ndim))
    norm = jax.lax.stop_gradient(
        jnp.sum(v, axis=axes, keepdims=True) / (jnp.sum(beta, axis=axes, keepdims=True) + _EPS)
    )
    loss = -alpha_t * beta * norm * log_pt
    return jnp.sum(loss, axis=axes) / (jnp.sum(v, axis=axes) + _EPS)


def seg_loss(logits: Array, target: Array, valid: Array, cfg: Any) -> Array:
    """The configured segmentation loss (``cfg.seg``: "nfl" or "bce_dice"), per sample."""
    if cfg.seg == "nfl":
        return normalized_focal_loss(logits, target, valid, cfg.focal_alpha, cfg.focal_gamma)
    if cfg.seg == "bce_dice":
        return bce(logits, target, valid) + cfg.dice_weight * dice(logits, target, valid)
    raise ValueError(f"unknown segmentation loss {cfg.seg!r} (expected 'nfl' or 'bce_dice')")


def boundary_band(mask: Array, radius: int) -> Array:
    """``bool[B, H, W]``: pixels within ``radius`` (Chebyshev) of the mask's boundary."""
    m = mask.astype(jnp.float32)
    k = 2 * int(radius) + 1
    win, strides = (1, k, k), (1, 1, 1)
    pad = ((0, 0), (radius, radius), (radius, radius))
    dil = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, win, strides, pad)
    ero = -jax.lax.reduce_window(-m, -jnp.inf, jax.lax.max, win, strides, pad)
    return (dil - ero) > 0.5


def iou_per_sample(pred: Array, gt: Array, valid: Array) -> Array:
    """IoU of bool masks over valid pixels, per sample (1 when the union is empty)."""
    p, g = pred & valid, gt & valid
    axes = tuple(range(1, p.ndim))
    inter = jnp.sum(p & g, axis=axes).astype(jnp.float32)
    union = jnp.sum(p | g, axis=axes).astype(jnp.float32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def round_losses(out: Any, gt: Array, valid: Array, mode: str, cfg: Any) -> dict[str, Array]:
    """Per-sample loss terms of one interaction round.

    Args:
      out: ``ClickOutputs`` of ``SamRef.click``.
      gt: ``bool[B, F, F]`` object mask in the frame; valid: ``bool[B, F, F]``.
      mode: "sam" (only SAM's logits and IoU head), "global" or "full".
      cfg: ``config.loss`` (see :func:`default_loss_config`).

    Returns:
      ``{"total": (B,), <term>: (B,) ...}`` (weighted total; terms unweighted).
    """
    terms: dict[str, Array] = {}
    weights: dict[str, float] = {}
    terms["sam"] = seg_loss(out.sam_logits, gt, valid, cfg)
    weights["sam"] = cfg.sam_weight if mode != "sam" else 1.0
    if cfg.iou_weight:
        true_iou = jax.lax.stop_gradient(iou_per_sample(out.sam_logits > 0, gt, valid))
        terms["iou_head"] = (out.score.astype(jnp.float32) - true_iou) ** 2
        weights["iou_head"] = cfg.iou_weight
    if mode in ("global", "full"):
        terms["global"] = seg_loss(out.global_logits, gt, valid, cfg)
        weights["global"] = cfg.global_weight
        err_target = jax.lax.stop_gradient((out.sam_logits > 0) != gt)
        terms["error"] = bce(out.global_error_logits, err_target, valid)
        weights["error"] = cfg.error_weight
    if mode == "full":
        terms["final"] = seg_loss(out.final_logits, gt, valid, cfg)
        weights["final"] = cfg.final_weight
        p = out.patch.patch_logits.shape[-1]
        win = jax.lax.stop_gradient(out.window)
        gt_p = crop_patches(gt.astype(jnp.float32), win, p) > 0.5
        valid_p = crop_patches(valid.astype(jnp.float32), win, p) > 0.5
        band = boundary_band(gt_p, int(cfg.patch_boundary_radius))
        w = 1.0 + cfg.patch_boundary_weight * band.astype(jnp.float32)
        terms["patch"] = bce(out.patch.patch_logits, gt_p, valid_p, w)
        weights["patch"] = cfg.patch_weight
    total = sum(weights[k] * terms[k] for k in terms)
    return {"total": total, **terms}


def round_weight_vector(cfg: Any, num_rounds: int) -> Array:
    """``float32[T]`` round weights from ``cfg.round_weights`` (last entry repeated)."""
    w = list(cfg.round_weights) or [1.0]
    w = (w + [w[-1]] * num_rounds)[:num_rounds]
    return jnp.asarray(w, jnp.float32)
