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

    def batched_nms(*args, **kwargs):
        raise NotImplementedError("not needed by the tests")

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
