"""Interactive-segmentation metrics (RITM protocol; docs/design.md, 'Evaluation protocol').

- ``IoU = |pred & gt & valid| / |(pred | gt) & valid|`` (ignore pixels excluded; 1.0 when the
  union is empty, i.e. empty object predicted empty).
- ``NoC@t``: 1-based index of the first click whose IoU is ``>= t``, or ``max_clicks`` if never.
- ``NoF@t``: number of samples whose NoC@t equals ``max_clicks`` (as RITM counts it, so a sample
  first reaching ``t`` on the very last click also counts).
- ``mIoU@k``: mean IoU after ``k`` clicks; ``5-mIoU`` is ``k = 5``. Curves shorter than
  ``max_clicks`` (early stop) are extended with their last value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "THRESHOLDS",
    "iou",
    "miou_curve",
    "noc",
    "noc_per_sample",
    "nof",
    "summarize",
]

THRESHOLDS = (0.85, 0.90, 0.95)


def iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of boolean ``pred`` and ``gt`` (``[H, W]``) over non-ignored pixels."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if ignore is not None:
        valid = ~np.asarray(ignore, dtype=bool)
        pred, gt = pred & valid, gt & valid
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & gt) / union)


def noc_per_sample(curves: Sequence[Sequence[float]], thr: float, max_clicks: int) -> np.ndarray:
    """``int[N]`` NoC@thr of each IoU curve (curve[k-1] is the IoU after k clicks)."""
    out = np.full(len(curves), max_clicks, dtype=np.int64)
    for i, curve in enumerate(curves):
        hit = np.flatnonzero(np.asarray(curve[:max_clicks], dtype=np.float64) >= thr)
        if hit.size:
            out[i] = hit[0] + 1
    return out


def noc(curves: Sequence[Sequence[float]], thr: float, max_clicks: int) -> float:
    """Mean number of clicks to reach IoU ``thr``."""
    return float(noc_per_sample(curves, thr, max_clicks).mean()) if len(curves) else float("nan")


def nof(curves: Sequence[Sequence[float]], thr: float, max_clicks: int) -> int:
    """Number of failures: samples whose NoC@thr equals ``max_clicks``."""
    return int((noc_per_sample(curves, thr, max_clicks) == max_clicks).sum())


def miou_curve(curves: Sequence[Sequence[float]], max_clicks: int) -> np.ndarray:
    """``float[max_clicks]``: mIoU@k for k = 1..max_clicks."""
    if not len(curves):
        return np.full(max_clicks, np.nan)
    padded = np.empty((len(curves), max_clicks), dtype=np.float64)
    for i, curve in enumerate(curves):
        c = np.asarray(curve[:max_clicks], dtype=np.float64)
        if c.size == 0:
            raise ValueError(f"sample {i} has an empty IoU curve")
        padded[i, : c.size] = c
        padded[i, c.size :] = c[-1]
    return padded.mean(axis=0)


def summarize(
    curves: Sequence[Sequence[float]], max_clicks: int, thresholds: Sequence[float] = THRESHOLDS
) -> dict:
    """The metric block of ``metrics.json``: NoC@t, NoF@t, mIoU@k list, 5-mIoU, num_samples."""
    out: dict = {}
    for t in thresholds:
        out[f"NoC@{round(t * 100)}"] = noc(curves, t, max_clicks)
    for t in thresholds:
        out[f"NoF@{round(t * 100)}"] = nof(curves, t, max_clicks)
    m = miou_curve(curves, max_clicks)
    out["mIoU@k"] = [float(v) for v in m]
    out["5-mIoU"] = float(m[4]) if max_clicks >= 5 else float("nan")
    out["num_samples"] = len(curves)
    return out
