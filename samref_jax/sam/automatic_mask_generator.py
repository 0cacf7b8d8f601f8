"""`SamAutomaticMaskGenerator`: the official automatic mask generator's API and semantics, on
the Flax port.

A grid of single positive points is prompted over the image (and, with `crop_n_layers`, over
overlapping crops of it); each point gives SAM's three multimask outputs, which are filtered by
predicted IoU, stability score and nearness to a crop's inner edge, de-duplicated with box NMS
per crop and then across crops, optionally cleaned of small holes and islands, and returned as
one record per mask.

Example:
  >>> from samref_jax import load_sam, SamAutomaticMaskGenerator
  >>> generator = SamAutomaticMaskGenerator(load_sam("checkpoints/vit_b"))  # doctest: +SKIP
  >>> records = generator.generate(image)                  # image: HxWx3 uint8  # doctest: +SKIP
  >>> sorted(records[0])                                                        # doctest: +SKIP
  ['area', 'bbox', 'crop_box', 'point_coords', 'predicted_iou', 'segmentation', 'stability_score']

Records are the official ones: `segmentation` (H, W) bool, or an uncompressed / COCO RLE dict;
`area` (pixels, int); `bbox` [x, y, w, h] (ints; w = x1 - x0 of the inclusive box, as the
official); `predicted_iou`, `stability_score` (floats); `point_coords` [[x, y]] (pixels of the
original image); `crop_box` [x, y, w, h] of the crop the mask came from.

Compute: the image embedding once per crop; each batch of `points_per_batch` prompts is one
jitted call (prompt encoder, mask decoder, upscaling to the crop's size, thresholding, stability
score and boxes) with static shapes: the last batch is padded, so a crop size compiles once.
The decoder's per-image first-layer products are computed once per crop. The upscaling of
the low-res logits to the crop's size is `upscale_masks`: SAM's two bilinear resizes composed
into one banded linear map per axis, applied as small matmuls (the same logits up to float32
rounding, a few times faster than gathers on XLA:CPU). Box NMS keeps ties in
input order (torchvision's CPU sort leaves them unspecified); see `samref_jax.sam.amg`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samref_jax.host import tune_malloc
from samref_jax.sam import amg
from samref_jax.sam.build import SamModel
from samref_jax.sam.common import resize_matrix
from samref_jax.sam.config import SamConfig
from samref_jax.sam.model import Sam
from samref_jax.sam.predictor import _dense_pe, _embed
from samref_jax.sam.transforms import (
    apply_coords,
    as_rgb_uint8,
    normalize_and_pad,
    resize_longest_side,
)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MASK_THRESHOLD = 0.0  # SAM's logit threshold (`Sam.mask_threshold` of the official model)

__all__ = ["OUTPUT_MODES", "SamAutomaticMaskGenerator"]


@functools.partial(jax.jit, static_argnums=(0,))
def _layer0(module: Sam, params, embedding, image_pe):
    return module.apply({"params": params}, embedding, image_pe, method=Sam.layer0_projections)


@functools.lru_cache(maxsize=64)
def _band_plan(
    n_low: int, frame: int, n_in: int, n_out: int, block: int = 128
) -> tuple[tuple[int, ...], np.ndarray]:
    """SAM's postprocessing along one axis as one linear map, in bands.

    Upscaling `n_low` -> `frame` (torch bilinear), keeping the first `n_in` pixels and
    resizing them to `n_out` is a linear map (n_out, n_low) with at most 3 non-zeros per row,
    on a diagonal band. Output pixels go in blocks of `block`; block i reads the K low-res
    pixels from `starts[i]` on. Returns `starts` and the weights (n_blocks, block, K) float32
    (composed in float64; the official rounds after each of the two resizes, so values differ
    by float32 rounding only).
    """
    m = resize_matrix(n_in, n_out).astype(np.float64) @ resize_matrix(n_low, frame)[:n_in]
    n_blocks = -(-n_out // block)
    m = np.concatenate([m, np.zeros((n_blocks * block - n_out, n_low))]).reshape(
        n_blocks, block, n_low
    )
    used = m.any(axis=1)  # (n_blocks, n_low)
    lo = np.argmax(used, axis=1)
    hi = n_low - 1 - np.argmax(used[:, ::-1], axis=1)
    k = int(min(n_low, -(-int((hi - lo + 1).max()) // 8) * 8))  # a multiple of 8
    starts = np.clip(lo, 0, n_low - k)
    weights = np.stack([m[i, :, s : s + k] for i, s in enumerate(starts)])
    return tuple(int(s) for s in starts), weights.astype(np.float32)


def _resample_last(x: jax.Array, plan: tuple[tuple[int, ...], np.ndarray], n_out: int):
    """(..., n_low) -> (..., n_out) by a `_band_plan`: one small matmul per band (XLA:CPU's
    gathers, which `resize_bilinear` uses, are several times slower at these sizes)."""
    starts, weights = plan
    k = weights.shape[-1]
    bands = jnp.stack([x[..., s : s + k] for s in starts], axis=-2)  # (..., n_blocks, K)
    y = jnp.einsum("...nk,nbk->...nb", bands, weights, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*x.shape[:-1], -1)[..., :n_out]


def _resample_rows(x: jax.Array, plan: tuple[tuple[int, ...], np.ndarray], n_out: int):
    """(..., n_low, W) -> (..., n_out, W) by a `_band_plan`."""
    starts, weights = plan
    k = weights.shape[-1]
    bands = jnp.stack([x[..., s : s + k, :] for s in starts], axis=-3)  # (..., n_blocks, K, W)
    y = jnp.einsum("...nkw,nbk->...nbw", bands, weights, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*x.shape[:-2], -1, x.shape[-1])[..., :n_out, :]


def upscale_masks(
    low: jax.Array, input_hw: tuple[int, int], crop_hw: tuple[int, int], config: SamConfig
) -> jax.Array:
    """SAM's `postprocess_masks` (upscale to the frame, crop the padding, resize to the
    original size) as two banded matmuls: low (..., 4S, 4S) logits -> (..., H, W) logits."""
    n_low = low.shape[-1]
    cols = _band_plan(n_low, config.img_size, input_hw[1], crop_hw[1])
    rows = _band_plan(n_low, config.img_size, input_hw[0], crop_hw[0])
    return _resample_rows(_resample_last(low, cols, crop_hw[1]), rows, crop_hw[0])


def _boxes_of(masks: jax.Array) -> jax.Array:
    """(N, H, W) bool -> (N, 4) int32 XYXY boxes (inclusive right/bottom; zeros if empty)."""
    h, w = masks.shape[-2:]
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)
    x0 = jnp.argmax(cols, axis=-1)
    y0 = jnp.argmax(rows, axis=-1)
    x1 = w - 1 - jnp.argmax(cols[:, ::-1], axis=-1)
    y1 = h - 1 - jnp.argmax(rows[:, ::-1], axis=-1)
    boxes = jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.int32)
    return jnp.where(rows.any(axis=-1)[:, None], boxes, 0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _predict_batch(
    module: Sam,
    input_hw: tuple[int, int],
    crop_hw: tuple[int, int],
    params,
    embedding: jax.Array,
    image_pe: jax.Array,
    layer0: dict[str, jax.Array],
    coords: jax.Array,
    offset: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One batch of single-point prompts on one crop's embedding.

    coords (P, 2) float32 (x, y) in the model's input frame; offset: the stability score's
    threshold offset. Returns, for the P * 3 multimask outputs (point-major): masks
    (P * 3, h, w) bool at the crop's size, predicted IoU (P * 3,), stability score (P * 3,)
    float32 (NaN for an empty mask) and boxes (P * 3, 4) int32 in the crop's frame.
    """
    p = coords.shape[0]
    # One positive point plus the official padding point (label -1) per prompt.
    slots = jnp.concatenate([coords[:, None], jnp.zeros((p, 1, 2), coords.dtype)], axis=1)
    labels = jnp.broadcast_to(jnp.array([[1, -1]], jnp.int32), (p, 2))
    low, iou = module.apply(
        {"params": params},
        embedding,
        slots,
        labels,
        None,
        None,
        image_pe,
        layer0,
        method=Sam.predict_masks,
    )
    low, iou = low[:, 1:], iou[:, 1:]  # multimask outputs
    logits = upscale_masks(low, input_hw, crop_hw, module.config)
    logits = logits.reshape(p * 3, *crop_hw)
    inter = jnp.sum(logits > MASK_THRESHOLD + offset, axis=(1, 2), dtype=jnp.int32)
    union = jnp.sum(logits > MASK_THRESHOLD - offset, axis=(1, 2), dtype=jnp.int32)
    stability = inter.astype(jnp.float32) / union.astype(jnp.float32)
    masks = logits > MASK_THRESHOLD
    return masks, iou.reshape(p * 3), stability, _boxes_of(masks)


class _Masks:
    """Masks kept so far, each as its box's window (bool) plus its XYXY box in the image frame,
    with per-mask arrays: iou, stability, points (x, y), crop boxes (XYXY)."""

    def __init__(self, image_hw: tuple[int, int]) -> None:
        self.image_hw = image_hw
        self.windows: list[np.ndarray] = []
        self.boxes = np.zeros((0, 4), np.int64)
        self.iou = np.zeros((0,), np.float32)
        self.stability = np.zeros((0,), np.float32)
        self.points = np.zeros((0, 2), np.float64)
        self.crop_boxes = np.zeros((0, 4), np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def extend(self, other: _Masks) -> None:
        self.windows += other.windows
        self.boxes = np.concatenate([self.boxes, other.boxes])
        self.iou = np.concatenate([self.iou, other.iou])
        self.stability = np.concatenate([self.stability, other.stability])
        self.points = np.concatenate([self.points, other.points])
        self.crop_boxes = np.concatenate([self.crop_boxes, other.crop_boxes])

    def select(self, idx: np.ndarray) -> None:
        self.windows = [self.windows[i] for i in idx]
        for name in ("boxes", "iou", "stability", "points", "crop_boxes"):
            setattr(self, name, getattr(self, name)[idx])

    def full_mask(self, i: int) -> np.ndarray:
        """(H, W) bool mask i in the image frame."""
        out = np.zeros(self.image_hw, bool)
        x0, y0, x1, y1 = self.boxes[i]
        out[y0 : y1 + 1, x0 : x1 + 1] = self.windows[i]
        return out

    def set_mask(self, i: int, mask: np.ndarray, box: np.ndarray) -> None:
        x0, y0, x1, y1 = box
        self.boxes[i] = box
        self.windows[i] = mask[y0 : y1 + 1, x0 : x1 + 1].copy()


class SamAutomaticMaskGenerator:
    """Masks for a whole image from a grid of point prompts (official semantics and defaults).

    Arguments are those of `segment_anything.SamAutomaticMaskGenerator` (see its docstring for
    the meaning of each); `sam` is a `SamModel` from `load_sam` (or a `SamPredictor`).
    `min_mask_region_area > 0` uses SciPy (8-connected regions, as the official's OpenCV call);
    `output_mode="coco_rle"` needs pycocotools.
    """

    def __init__(
        self,
        sam: SamModel,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        self.check_output_mode(output_mode)
        if int(points_per_batch) < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if int(crop_n_layers) < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if points_per_side is not None:
            if int(points_per_side) < 1:
                raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
            grids = amg.build_all_layer_point_grids(
                int(points_per_side), int(crop_n_layers), crop_n_points_downscale_factor
            )
        else:
            grids = [np.asarray(g, np.float64).reshape(-1, 2) for g in point_grids]
            if len(grids) < crop_n_layers + 1:
                raise ValueError(
                    f"point_grids holds {len(grids)} grid(s); crop_n_layers={crop_n_layers} "
                    f"needs {crop_n_layers + 1} (one per layer)"
                )
        if hasattr(sam, "model") and isinstance(sam.model, SamModel):  # a SamPredictor
            sam = sam.model
        tune_malloc()
        self.model = sam
        self.point_grids = grids
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = int(min_mask_region_area)
        self.output_mode = output_mode
        self._image_pe = _dense_pe(sam.module, sam.params)

    # ------------------------------------------------------------------------------ public
    @staticmethod
    def check_output_mode(output_mode: str) -> None:
        """ValueError for an unknown mode; ImportError for "coco_rle" without pycocotools."""
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {output_mode!r}; expected one of {OUTPUT_MODES}")
        if output_mode == "coco_rle":
            try:
                import pycocotools  # noqa: F401
            except ImportError:
                raise ImportError(
                    "output_mode='coco_rle' needs pycocotools: pip install pycocotools"
                ) from None

    def crop_boxes(self, image_hw: tuple[int, int]) -> tuple[list[list[int]], list[int]]:
        """The crops `generate` runs on an image of this (H, W): XYXY boxes and their layers."""
        return amg.generate_crop_boxes(image_hw, self.crop_n_layers, self.crop_overlap_ratio)

    def num_batches(self, image_hw: tuple[int, int]) -> int:
        """How many jitted prompt batches `generate` runs for an image of this (H, W)."""
        _, layers = self.crop_boxes(image_hw)
        b = self.points_per_batch
        return sum(-(-len(self.point_grids[i]) // b) for i in layers)

    def generate(
        self,
        image: np.ndarray,
        progress: Callable[[int], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Masks of `image` (HxWx3 uint8 RGB; grey, RGBA and 16-bit are converted) as records.

        `progress(n)`, if given, is called after each prompt batch with n = 1 (e.g. a tqdm
        bar's `update`; `num_batches` gives the total). Records are sorted as the official
        generator returns them (by NMS order).
        """
        image = as_rgb_uint8(image)
        masks = self._generate_masks(image, progress)
        if self.min_mask_region_area > 0 and len(masks):
            self._remove_small_regions(
                masks, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return [self._record(masks, i) for i in range(len(masks))]

    # ----------------------------------------------------------------------------- internals
    def _record(self, masks: _Masks, i: int) -> dict[str, Any]:
        full = masks.full_mask(i)
        segmentation: Any = full
        if self.output_mode == "uncompressed_rle":
            segmentation = amg.mask_to_rle(full)
        elif self.output_mode == "coco_rle":
            segmentation = amg.coco_encode_rle(full)
        return {
            "segmentation": segmentation,
            "area": int(masks.windows[i].sum()),
            "bbox": amg.box_xyxy_to_xywh(masks.boxes[i]),
            "predicted_iou": float(masks.iou[i]),
            "point_coords": [masks.points[i].tolist()],
            "stability_score": float(masks.stability[i]),
            "crop_box": amg.box_xyxy_to_xywh(masks.crop_boxes[i]),
        }

    def _generate_masks(self, image: np.ndarray, progress: Callable[[int], Any] | None) -> _Masks:
        image_hw = (int(image.shape[0]), int(image.shape[1]))
        crop_boxes, layers = self.crop_boxes(image_hw)
        data = _Masks(image_hw)
        for crop_box, layer in zip(crop_boxes, layers, strict=True):
            data.extend(self._process_crop(image, crop_box, layer, progress))
        if len(crop_boxes) > 1 and len(data):
            # Across crops, prefer masks of smaller crops (float32 1 / area, as the official).
            cb = data.crop_boxes.astype(np.float32)
            area = (cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])
            keep = amg.nms(data.boxes, np.float32(1.0) / area, self.crop_nms_thresh)
            data.select(keep)
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        layer: int,
        progress: Callable[[int], Any] | None,
    ) -> _Masks:
        model = self.model
        cfg = model.config
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        crop_hw = (int(crop.shape[0]), int(crop.shape[1]))
        resized = resize_longest_side(crop, cfg.img_size)
        input_hw = (int(resized.shape[0]), int(resized.shape[1]))
        embedding = _embed(model.module, model.params, jnp.asarray(normalize_and_pad(resized, cfg)))
        layer0 = _layer0(model.module, model.params, embedding, self._image_pe)

        points = self.point_grids[layer] * np.array(crop_hw[::-1], np.float64)[None]
        frame = apply_coords(points, crop_hw, cfg.img_size).astype(np.float32)
        n = len(points)
        size = min(self.points_per_batch, n)
        offset = jnp.float32(self.stability_score_offset)
        image_h, image_w = image.shape[:2]

        def launch(start: int):
            chunk = frame[start : start + size]
            if len(chunk) < size:  # static shapes: pad the last batch (results dropped)
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk), 2), np.float32)])
            return _predict_batch(
                model.module,
                input_hw,
                crop_hw,
                model.params,
                embedding,
                self._image_pe,
                layer0,
                jnp.asarray(chunk),
                offset,
            )

        out = _Masks(image.shape[:2])
        starts = list(range(0, n, size))
        pending = launch(starts[0]) if starts else None
        for k, start in enumerate(starts):
            result = pending
            # Dispatch the next batch before reading this one: the device works meanwhile.
            pending = launch(starts[k + 1]) if k + 1 < len(starts) else None
            count = 3 * min(size, n - start)
            masks, iou, stability, boxes = (np.asarray(x)[:count] for x in result)
            keep = np.ones(count, bool)
            if self.pred_iou_thresh > 0.0:
                keep &= iou > self.pred_iou_thresh
            if self.stability_score_thresh > 0.0:
                keep &= stability >= self.stability_score_thresh
            keep &= ~amg.is_box_near_crop_edge(boxes, crop_box, [0, 0, image_w, image_h])
            idx = np.flatnonzero(keep)
            batch = _Masks(out.image_hw)
            # Each kept mask as its box's window (the rest of the mask is empty).
            batch.windows = [
                masks[i, y0_ : y1_ + 1, x0_ : x1_ + 1].copy()
                for i, (x0_, y0_, x1_, y1_) in zip(idx, boxes[idx], strict=True)
            ]
            batch.boxes = boxes[idx].astype(np.int64)
            batch.iou = iou[idx]
            batch.stability = stability[idx]
            batch.points = np.repeat(points[start : start + size], 3, axis=0)[idx]
            batch.crop_boxes = np.tile(np.asarray(crop_box, np.int64), (len(idx), 1))
            out.extend(batch)
            if progress is not None:
                progress(1)

        # Duplicates within the crop, then back to the image frame.
        out.select(amg.nms(out.boxes, out.iou, self.box_nms_thresh))
        shift = np.array([x0, y0, x0, y0], np.int64)
        out.boxes = out.boxes + shift
        out.points = out.points + np.array([x0, y0], np.float64)
        return out

    @staticmethod
    def _remove_small_regions(masks: _Masks, min_area: int, nms_thresh: float) -> None:
        """Fills small holes and removes small islands of every mask, then box NMS (unchanged
        masks first) drops new duplicates. Edits `masks` in place."""
        new_masks, scores = [], []
        for i in range(len(masks)):
            mask = masks.full_mask(i)
            mask, changed_holes = amg.remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = amg.remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(mask)
            scores.append(0.0 if (changed_holes or changed_islands) else 1.0)
        boxes = np.concatenate([amg.masks_to_boxes(m[None]) for m in new_masks])
        keep = amg.nms(boxes, np.asarray(scores, np.float32), nms_thresh)
        for i in keep:
            if scores[i] == 0.0:
                masks.set_mask(i, new_masks[i], boxes[i])
        masks.select(keep)
