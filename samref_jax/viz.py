"""Overlays for interactive segmentation, drawn with Pillow (no Matplotlib, no display needed).

Example:
  >>> im = overlay(image, result.mask, clicks=[(120, 80, True), (60, 40, False)],
  ...              window=result.window)                               # doctest: +SKIP
  >>> im.save("overlay.png"); mask_image(result.mask).save("mask.png")  # doctest: +SKIP

Conventions: clicks are ``(x, y, positive)`` in original-image pixels (the order of
``SamRefPredictor.clicks``); the PatchDiff window is ``(x0, y0, x1, y1)`` in the same pixels.
Positive clicks are green disks, negative clicks red disks with a white minus bar, both with a
white ring and numbered in order; the mask is a translucent blue tint with a solid outline; the
window is a yellow dashed rectangle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "MASK_COLOR",
    "NEGATIVE_COLOR",
    "POSITIVE_COLOR",
    "WINDOW_COLOR",
    "draw_clicks",
    "draw_window",
    "mask_image",
    "overlay",
    "side_by_side",
    "tint",
]

MASK_COLOR = (30, 144, 255)
POSITIVE_COLOR = (40, 200, 40)
NEGATIVE_COLOR = (230, 40, 40)
WINDOW_COLOR = (255, 215, 0)

Click = tuple[float, float, bool]


def _rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return image[..., :3]


def _check_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.shape != hw:
        raise ValueError(f"mask shape {mask.shape} does not match the image ({hw[0]}, {hw[1]})")
    return mask


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the mask's inner boundary)."""
    p = np.pad(mask, 1, mode="edge")
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def mask_image(mask: np.ndarray) -> Image.Image:
    """A ``bool[H, W]`` mask as an 8-bit greyscale PNG-ready image: 255 object, 0 background."""
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def tint(
    image: np.ndarray | Image.Image,
    mask: np.ndarray | None,
    color: tuple[int, int, int] = MASK_COLOR,
    alpha: float = 0.45,
    outline: bool = True,
) -> Image.Image:
    """``image`` with ``mask`` tinted in ``color`` (and its boundary drawn solid)."""
    rgb = _rgb(image)
    if mask is None:
        return Image.fromarray(rgb.copy())
    mask = _check_mask(mask, rgb.shape[:2])
    out = rgb.astype(np.float32)
    c = np.asarray(color, np.float32)
    out[mask] = out[mask] * (1.0 - alpha) + c * alpha
    if outline:
        edge = _outline(mask)
        out[edge] = c
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def _marker_radius(size: tuple[int, int]) -> int:
    return int(max(4, round(min(size) / 70)))


def draw_clicks(
    im: Image.Image, clicks: Sequence[Click], radius: int | None = None, numbers: bool = True
) -> Image.Image:
    """Draw click markers on ``im`` in place (and return it)."""
    draw = ImageDraw.Draw(im)
    r = radius or _marker_radius(im.size)
    for n, (x, y, positive) in enumerate(clicks, start=1):
        x, y = float(x) + 0.5, float(y) + 0.5  # centre of the clicked pixel
        fill = POSITIVE_COLOR if positive else NEGATIVE_COLOR
        draw.ellipse((x - r - 1, y - r - 1, x + r + 1, y + r + 1), fill=(255, 255, 255))
        draw.ellipse((x - r + 1, y - r + 1, x + r - 1, y + r - 1), fill=fill)
        bar = max(1, r // 3)
        half = max(2, r - 3)
        draw.rectangle((x - half, y - bar / 2, x + half, y + bar / 2), fill=(255, 255, 255))
        if positive:
            draw.rectangle((x - bar / 2, y - half, x + bar / 2, y + half), fill=(255, 255, 255))
        if numbers:
            tx, ty = x + r + 2, y - r - 2
            for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                draw.text((tx + dx, ty + dy), str(n), fill=(0, 0, 0))
            draw.text((tx, ty), str(n), fill=(255, 255, 255))
    return im


def draw_window(
    im: Image.Image,
    window: Sequence[float] | None,
    color: tuple[int, int, int] = WINDOW_COLOR,
    width: int | None = None,
    dash: int | None = None,
) -> Image.Image:
    """Draw the PatchDiff window ``(x0, y0, x1, y1)`` as a dashed rectangle, in place."""
    if window is None:
        return im
    x0, y0, x1, y1 = (float(v) for v in window)
    w, h = im.size
    x0, x1 = max(0.0, min(x0, x1)), min(w - 1.0, max(x0, x1))
    y0, y1 = max(0.0, min(y0, y1)), min(h - 1.0, max(y0, y1))
    if x1 <= x0 or y1 <= y0:
        return im
    draw = ImageDraw.Draw(im)
    lw = width or max(2, round(min(w, h) / 250))
    d = dash or max(6, round(min(w, h) / 60))

    def segments(a: float, b: float):
        t = a
        while t < b:
            yield t, min(t + d, b)
            t += 2 * d

    for a, b in segments(x0, x1):
        draw.line((a, y0, b, y0), fill=color, width=lw)
        draw.line((a, y1, b, y1), fill=color, width=lw)
    for a, b in segments(y0, y1):
        draw.line((x0, a, x0, b), fill=color, width=lw)
        draw.line((x1, a, x1, b), fill=color, width=lw)
    return im


def overlay(
    image: np.ndarray | Image.Image,
    mask: np.ndarray | None = None,
    clicks: Sequence[Click] = (),
    window: Sequence[float] | None = None,
    *,
    color: tuple[int, int, int] = MASK_COLOR,
    alpha: float = 0.45,
    title: str = "",
) -> Image.Image:
    """The image with the mask tinted, the clicks marked and the PatchDiff window drawn.

    Args:
      image: ``uint8[H, W, 3]`` (or a PIL image).
      mask: ``bool[H, W]`` or ``None``.
      clicks: ``(x, y, positive)`` in pixels, in click order.
      window: ``(x0, y0, x1, y1)`` PatchDiff window in pixels, or ``None``.
      title: optional caption drawn in the top-left corner.

    Returns:
      An RGB PIL image of the same size as ``image``.
    """
    im = tint(image, mask, color=color, alpha=alpha)
    draw_window(im, window)
    draw_clicks(im, clicks)
    if title:
        draw = ImageDraw.Draw(im)
        box = draw.textbbox((4, 2), title)
        draw.rectangle((0, 0, box[2] + 4, box[3] + 3), fill=(0, 0, 0))
        draw.text((4, 2), title, fill=(255, 255, 255))
    return im


def side_by_side(
    panels: Sequence[Image.Image], titles: Sequence[str] | None = None, gap: int = 4
) -> Image.Image:
    """Concatenate same-height images left to right (white gaps), each with its title on top."""
    if not panels:
        raise ValueError("no panels")
    h = max(p.height for p in panels)
    w = sum(p.width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for i, p in enumerate(panels):
        p = p.convert("RGB")
        if titles and i < len(titles) and titles[i]:
            p = p.copy()
            draw = ImageDraw.Draw(p)
            box = draw.textbbox((4, 2), titles[i])
            draw.rectangle((0, 0, box[2] + 4, box[3] + 3), fill=(0, 0, 0))
            draw.text((4, 2), titles[i], fill=(255, 255, 255))
        out.paste(p, (x, 0))
        x += p.width + gap
    return out
