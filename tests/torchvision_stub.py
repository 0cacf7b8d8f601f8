"""A stand-in for the few torchvision functions `segment_anything` imports.

PyPI's torchvision does not load beside the local torch 2.13.0 CPU wheel (docs/design.md,
'Testing against the official SAM'), so tests install this module under the name
`torchvision` before importing `segment_anything`. `resize` on a PIL image is PIL bilinear,
exactly what torchvision does for PIL inputs.
"""

from __future__ import annotations

import sys
import types

import numpy as np
from PIL import Image


def install() -> None:
    try:
        import torchvision  # noqa: F401

        return
    except Exception:
        pass
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")

    def to_pil_image(pic):
        return Image.fromarray(np.asarray(pic))

    def resize(img, size, *args, **kwargs):
        h, w = size
        return img.resize((w, h), Image.BILINEAR)

    def box_area(b):
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    def batched_nms(boxes, scores, idxs, iou_threshold):
        """torchvision's CPU NMS kernel per category, in torch; ties in score are taken in
        index order (a stable sort; torchvision's unstable sort leaves them unspecified)."""
        import torch

        offsets = idxs.to(boxes) * (boxes.max() + 1) if boxes.numel() else idxs.to(boxes)
        b = boxes + offsets[:, None]
        order = torch.sort(scores, descending=True, stable=True).indices
        areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        suppressed = torch.zeros(len(b), dtype=torch.bool)
        keep = []
        for i in order.tolist():
            if suppressed[i]:
                continue
            keep.append(i)
            w = (torch.minimum(b[i, 2], b[:, 2]) - torch.maximum(b[i, 0], b[:, 0])).clamp(min=0)
            h = (torch.minimum(b[i, 3], b[:, 3]) - torch.maximum(b[i, 1], b[:, 1])).clamp(min=0)
            inter = w * h
            suppressed |= (inter / (areas[i] + areas - inter)).double() > iou_threshold
        return torch.tensor(keep, dtype=torch.int64)

    functional.resize = resize
    functional.to_pil_image = to_pil_image
    boxes.box_area = box_area
    boxes.batched_nms = batched_nms
    transforms.functional = functional
    ops.boxes = boxes
    tv.transforms = transforms
    tv.ops = ops
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops,
            "torchvision.ops.boxes": boxes,
        }
    )
