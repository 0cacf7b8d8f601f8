"""Host-side checks and conversions of the prompts beyond clicks (`SamRefPredictor.set_box`,
`SamRefPredictor.set_mask`): a box, and an initial mask to correct.

Example:
  >>> import numpy as np
  >>> check_box((2, 3, 40, 30), (32, 48))
  (2.0, 3.0, 40.0, 30.0)
  >>> m = np.zeros((32, 48), bool); m[8:24, 10:30] = True
  >>> f = mask_to_frame_logits(m, (43, 64), 64, 20.0)
  >>> f.shape, f.dtype, float(f.max()), float(f.min())
  ((64, 64), dtype('float32'), 20.0, -20.0)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["check_box", "check_mask", "mask_to_frame_logits"]


def check_box(box: tuple[float, float, float, float], hw: tuple[int, int]) -> tuple[float, ...]:
    """The box ``(x0, y0, x1, y1)`` in original pixels as four floats, or one-line ValueError.

    The box must lie in the ``hw = (H, W)`` image (``0 <= x0 < x1 <= W``, ``0 <= y0 < y1 <= H``;
    SAM's XYXY convention) with a positive width and height.
    """
    vals = np.asarray(box, np.float64).reshape(-1)
    if vals.shape != (4,) or not np.isfinite(vals).all():
        raise ValueError(f"a box is four finite numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in vals)
    h, w = hw
    if not (0 <= x0 <= w and 0 <= x1 <= w and 0 <= y0 <= h and 0 <= y1 <= h):
        raise ValueError(
            f"box ({x0}, {y0}, {x1}, {y1}) is outside the image: x must be in [0, {w}] and "
            f"y in [0, {h}]"
        )
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"box ({x0}, {y0}, {x1}, {y1}) is degenerate: it needs x0 < x1 and y0 < y1"
        )
    return x0, y0, x1, y1


def check_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``mask`` as ``bool[H, W]`` (nonzero = object), or one-line ValueError when its shape is
    not the image's ``hw``."""
    m = np.asarray(mask)
    if m.shape != tuple(hw):
        raise ValueError(f"the mask is {m.shape} but the image is {tuple(hw)} (H, W)")
    return m != 0


def mask_to_frame_logits(
    mask: np.ndarray, input_hw: tuple[int, int], frame: int, value: float
) -> np.ndarray:
    """A mask as frame logits: ``+value`` inside, ``-value`` outside, resized like the image.

    Args:
      mask: ``bool[H, W]`` in original pixels.
      input_hw: (h, w) of the image resized into the frame (``resize_longest_side``).
      frame: F, the frame's side.
      value: the logit magnitude (the predictor: ``-first_prev_logit``).

    Returns:
      ``float32[F, F]``: the +/-value map resized to ``input_hw`` with PIL bilinear (as the
      image is resized, so a mask edge sits where the image's does), then padded with
      ``-value`` (the padding is background).
    """
    h, w = input_hw
    signed = np.where(np.asarray(mask, bool), value, -value).astype(np.float32)
    resized = np.asarray(Image.fromarray(signed).resize((w, h), Image.BILINEAR))
    out = np.full((frame, frame), -value, np.float32)
    out[:h, :w] = resized
    return out
