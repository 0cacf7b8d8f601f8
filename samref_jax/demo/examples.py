"""Example images for the demo and the notebook, generated procedurally (no licence questions).

The bundled files in ``samref_jax/assets/examples/`` were written by :func:`write_examples`;
each ``NAME.png`` has its ground truth ``NAME_mask.png`` (255 object, 0 background). The
benchmark images under ``shared/data`` (GrabCut, COCO) are research-use only and are not
redistributed with the package.

Example:
  >>> image, gt = synthetic_scene(seed=1)       # uint8[H, W, 3], int8[H, W] (1 object, 0 not)
  >>> [p.name for p in example_paths()]          # doctest: +SKIP
  ['blob_on_stripes.png', 'shapes_on_grass.png']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["EXAMPLES_DIR", "example_paths", "load_example", "synthetic_scene", "write_examples"]

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"

# name -> (seed, (height, width))
EXAMPLES = {
    "blob_on_stripes": (0, (240, 320)),
    "shapes_on_grass": (3, (240, 320)),
}


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [0, 1] (cheap value noise)."""
    gh, gw = cells + 1, max(2, round(cells * w / h)) + 1
    grid = rng.random((gh, gw))
    ys = np.linspace(0, gh - 1, h)
    xs = np.linspace(0, gw - 1, w)
    y0 = np.clip(ys.astype(int), 0, gh - 2)
    x0 = np.clip(xs.astype(int), 0, gw - 2)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _blob(h: int, w: int, cy: float, cx: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """A star-ish closed shape: radius varying smoothly with the angle."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ang = np.arctan2(yy - cy, xx - cx)
    rad = np.hypot(yy - cy, xx - cx)
    rr = np.full_like(ang, r)
    for k in (2, 3, 5):
        rr += r * rng.uniform(0.04, 0.14) * np.sin(k * ang + rng.uniform(0, 2 * np.pi))
    return rad <= rr


def synthetic_scene(
    seed: int = 0, size: tuple[int, int] = (240, 320)
) -> tuple[np.ndarray, np.ndarray]:
    """A textured background, a few distractor shapes and one shaded object.

    Args:
      seed: scene seed (deterministic).
      size: ``(height, width)``.

    Returns:
      ``(image, gt)``: ``uint8[H, W, 3]`` RGB and ``int8[H, W]`` with 1 on the object.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(60, 170, 3)
    tone = _smooth_noise(rng, h, w, 4)[..., None]
    if seed % 2 == 0:  # stripes
        pattern = 0.5 + 0.5 * np.sin((xx + 0.6 * yy) / rng.uniform(5, 9))[..., None]
    else:  # grass-like noise
        pattern = _smooth_noise(rng, h, w, 24)[..., None]
    img = base * (0.7 + 0.3 * tone) + 35 * (pattern - 0.5)
    # Distractors: rectangles and disks in other colours.
    for _ in range(4):
        col = rng.uniform(30, 230, 3)
        if rng.random() < 0.5:
            y0, x0 = rng.integers(0, h - 30), rng.integers(0, w - 30)
            hh, ww = rng.integers(15, h // 3), rng.integers(15, w // 3)
            region = (yy >= y0) & (yy < y0 + hh) & (xx >= x0) & (xx < x0 + ww)
        else:
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, min(h, w) / 6)
            region = np.hypot(yy - cy, xx - cx) < r
        img[region] = 0.6 * col + 0.4 * img[region]
    # The object: a shaded blob near the centre, partly over the distractors.
    cy = h * rng.uniform(0.4, 0.6)
    cx = w * rng.uniform(0.4, 0.6)
    r = min(h, w) * rng.uniform(0.22, 0.3)
    obj = _blob(h, w, cy, cx, r, rng)
    col = rng.uniform(40, 230, 3)
    shade = 1.0 - 0.45 * np.clip(np.hypot(yy - (cy - r / 3), xx - (cx - r / 3)) / (1.6 * r), 0, 1)
    spots = _smooth_noise(rng, h, w, 10)
    obj_img = col * shade[..., None] * (0.85 + 0.3 * spots[..., None])
    img[obj] = obj_img[obj]
    img += rng.normal(0, 3.0, img.shape)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return image, obj.astype(np.int8)


def write_examples(folder: str | Path = EXAMPLES_DIR) -> list[Path]:
    """Write every entry of ``EXAMPLES`` as ``NAME.png`` and ``NAME_mask.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (seed, size) in EXAMPLES.items():
        image, gt = synthetic_scene(seed, size)
        Image.fromarray(image).save(folder / f"{name}.png", optimize=True)
        Image.fromarray((gt > 0).astype(np.uint8) * 255).save(folder / f"{name}_mask.png")
        out.append(folder / f"{name}.png")
    return out


def example_paths(folder: str | Path = EXAMPLES_DIR) -> list[Path]:
    """Bundled example images (not their masks), sorted; empty if none are there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.png") if not p.stem.endswith("_mask"))


def load_example(name_or_path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(image, gt)`` of a bundled example (by name or path); ``gt`` is None without a mask."""
    p = Path(name_or_path)
    if not p.suffix:
        p = EXAMPLES_DIR / f"{p.name}.png"
    from samref_jax.data.decode import read_image

    image = read_image(p)
    m = p.with_name(p.stem + "_mask.png")
    gt = None
    if m.is_file():
        gt = (np.asarray(Image.open(m).convert("L")) > 127).astype(np.int8)
    return image, gt


if __name__ == "__main__":  # regenerate the bundled examples
    for path in write_examples():
        print(path)
