"""Host-side (NumPy) utilities of automatic mask generation: point grids, crop boxes, boxes of
masks, box NMS, run-length encoding and small-region removal.

Conventions are the official `segment_anything.utils.amg`'s: points are (x, y) pixels; boxes
are XYXY with the right and bottom edges *inclusive* pixel indices (a one-pixel mask at (x, y)
has the box (x, y, x, y), of area 0); crop boxes are XYXY with exclusive right and bottom
edges; uncompressed RLEs count runs in column-major (Fortran) order, starting with a run of
zeros, as pycocotools does.

Example:
  >>> import numpy as np
  >>> from samref_jax.sam import amg
  >>> amg.build_point_grid(2)
  array([[0.25, 0.25],
         [0.75, 0.25],
         [0.25, 0.75],
         [0.75, 0.75]])
  >>> m = np.zeros((3, 4), bool); m[1, 1:3] = True
  >>> amg.masks_to_boxes(m[None]).tolist(), amg.mask_to_rle(m)
  ([[1, 1, 2, 1]], {'size': [3, 4], 'counts': [4, 1, 2, 1, 4]})
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "area_from_rle",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle",
    "masks_to_boxes",
    "nms",
    "remove_small_regions",
    "rle_to_mask",
]


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n_per_side**2, 2) float64 (x, y) cell centres of a regular grid on [0, 1]^2, x fastest."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1.0 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One grid per crop layer 0..n_layers; layer i has int(n_per_side / scale**i) points a side."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY, exclusive right/bottom, pixels) and their layer indices.

    Layer 0 is the whole image; layer i >= 1 tiles it with (2**i)**2 overlapping crops, which
    overlap by `overlap_ratio` of the short side scaled by 2 / 2**i (rounded down to pixels).
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for i_layer in range(1, n_layers + 1):
        n_side = 2**i_layer
        overlap = int(overlap_ratio * short_side * (2 / n_side))
        crop_w = int(math.ceil((overlap * (n_side - 1) + im_w) / n_side))
        crop_h = int(math.ceil((overlap * (n_side - 1) + im_h) / n_side))
        x0s = [int((crop_w - overlap) * i) for i in range(n_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_side)]
        for x0, y0 in itertools.product(x0s, y0s):  # x-major, as the official order
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer)
    return boxes, layers


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) int64 XYXY boxes with inclusive right/bottom; (0, 0, 0, 0) for
    an empty mask."""
    masks = np.asarray(masks, bool)
    n, h, w = masks.shape
    out = np.zeros((n, 4), np.int64)
    if n == 0 or h == 0 or w == 0:
        return out
    rows = masks.any(axis=2)  # (N, H)
    cols = masks.any(axis=1)  # (N, W)
    nonempty = rows.any(axis=1)
    out[:, 0] = np.argmax(cols, axis=1)
    out[:, 1] = np.argmax(rows, axis=1)
    out[:, 2] = w - 1 - np.argmax(cols[:, ::-1], axis=1)
    out[:, 3] = h - 1 - np.argmax(rows[:, ::-1], axis=1)
    out[~nonempty] = 0
    return out


def box_xyxy_to_xywh(box: Sequence[float] | np.ndarray) -> list:
    """One XYXY box -> [x, y, w, h] as Python numbers (w = x1 - x0, no +1)."""
    x0, y0, x1, y1 = np.asarray(box).tolist()
    return [x0, y0, x1 - x0, y1 - y0]


def is_box_near_crop_edge(
    boxes: np.ndarray,
    crop_box: Sequence[int],
    orig_box: Sequence[int],
    atol: float = 20.0,
) -> np.ndarray:
    """(N, 4) boxes in the crop's frame -> (N,) bool: some edge lies within `atol` pixels of the
    crop's edge but not within `atol` of the image's (`orig_box`, XYXY) edge."""
    x0, y0 = crop_box[0], crop_box[1]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) + np.float32([x0, y0, x0, y0])
    near_crop = np.abs(boxes - np.float32(crop_box)) <= atol
    near_image = np.abs(boxes - np.float32(orig_box)) <= atol
    return np.any(near_crop & ~near_image, axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy box non-maximum suppression, torchvision's `nms` semantics.

    boxes (N, 4) XYXY, scores (N,) -> int64 indices of the kept boxes by descending score. A box
    is dropped when its IoU with a kept, higher-scored box is > `iou_threshold`. Areas and IoUs
    are float32 (as torchvision computes them for float32 boxes); the area of a box is
    (x1 - x0) * (y1 - y0), so a zero-area box suppresses nothing and is never suppressed.
    Equal scores keep their input order (a stable sort; torchvision's CPU sort leaves such ties
    in an unspecified order).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    b = boxes[order]
    x0, y0, x1, y1 = b.T
    areas = (x1 - x0) * (y1 - y0)
    n = len(order)
    suppressed = np.zeros(n, bool)
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = slice(i + 1, n)
            w = np.maximum(np.float32(0), np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
            h = np.maximum(np.float32(0), np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            suppressed[rest] |= iou.astype(np.float64) > iou_threshold
    return order[np.asarray(keep, np.int64)].astype(np.int64)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> uncompressed RLE {"size": [H, W], "counts": [...]} (column-major runs,
    first run of zeros, possibly 0), pycocotools' uncompressed form."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [h * w]])
    counts = np.diff(edges).tolist()
    if h * w and flat[0]:
        counts = [0, *counts]
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> (H, W) bool (C order)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = (np.arange(len(counts)) % 2).astype(bool)
    return np.repeat(values, counts).reshape(w, h).T.copy()


def area_from_rle(rle: dict[str, Any]) -> int:
    """Pixels set in an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> pycocotools' compressed RLE {"size": [H, W], "counts": str} (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}


_EIGHT_CONNECTED = np.ones((3, 3), np.int32)


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fills holes (`mode="holes"`) or removes islands (`mode="islands"`) of fewer than
    `area_thresh` pixels from an (H, W) bool mask; returns the mask and whether it changed.

    Regions are 8-connected (OpenCV's `connectedComponentsWithStats(..., 8)`, which the
    official uses; here `scipy.ndimage.label`, whose labels follow the same raster order). In
    "holes" mode a hole is any connected region of unset pixels, including one touching the
    border. In "islands" mode, when every island is small the largest (the first of equal
    sizes) is kept.
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, bool)
    holes = mode == "holes"
    working = ~mask if holes else mask
    regions, n = ndimage.label(working, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if len(small) == 0:
        return mask, False
    if holes:
        return mask | np.isin(regions, small), True
    keep = np.setdiff1d(np.arange(1, n + 1), small)
    if len(keep) == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, keep), True
