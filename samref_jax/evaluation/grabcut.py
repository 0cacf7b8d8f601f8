"""OpenCV GrabCut as a classical, non-learned peer in the NoC tables (``--method opencv-grabcut``).

:class:`GrabCutPredictor` has the click-predictor API of
:mod:`samref_jax.evaluation.evaluator` (``set_image`` / ``click`` / ``reset``), so the very same
loop drives it: the clicks come from :func:`samref_jax.interaction.clicker.next_click` on the
current prediction against the ground truth (the first one on an empty prediction), and the
IoU, NoC, NoF, mIoU@k, per-click times and output files are those of a model run.

The seeding rule, per sample (one image, one object):

1. The label mask starts as ``GC_PR_BGD`` everywhere.
2. After every click, every click so far is drawn into it as a disk of ``radius`` pixels (in the
   original image's pixels): ``GC_FGD`` for a positive click, ``GC_BGD`` for a negative one, in
   click order (a later disk overwrites an earlier one where they overlap).
3. ``cv2.grabCut`` runs ``iterations`` iterations on the original image (BGR, ``uint8``).
   What carries over from one click to the next is ``carry``:

   - ``"none"`` (default): every click starts again from step 1 (all ``GC_PR_BGD`` plus every
     click's disk) with ``GC_INIT_WITH_MASK``: the prediction depends on the clicks only. The
     strongest of the three on GrabCut (docs/evaluation.md): carried-over colour models fitted
     on the first disks barely adapt to the object's other colours.
   - ``"models"``: the first run uses ``GC_INIT_WITH_MASK`` (colour GMMs fitted by
     k-means++ on the mask); every later click of the sample uses ``GC_EVAL``, which keeps the
     GMMs (``bgdModel`` / ``fgdModel``) and starts from the label mask the previous run left,
     with the click disks drawn again on top: the segmentation keeps refining.
   - ``"mask"``: the label mask carries over as above, but every run uses
     ``GC_INIT_WITH_MASK``, which refits both GMMs from scratch on the current labels
     (OpenCV ignores the model arrays passed in that mode).

4. The prediction is the mask's ``GC_FGD`` or ``GC_PR_FGD`` pixels. While the mask holds fewer
   than 5 foreground (or background) pixels, too few for a 5-component GMM (before the first
   positive click, say), GrabCut is not run and the prediction is those pixels.

OpenCV's random generator (k-means++ seeding of the GMMs) is reset with ``cv2.setRNGSeed(0)``
at the start of every sample, so a run is deterministic and a resumed run matches a fresh one.
OpenCV is an optional dependency (``pip install samref-jax[opencv]``); it is imported lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "CARRY",
    "DEFAULT_ITERATIONS",
    "DEFAULT_RADIUS",
    "INSTALL_HINT",
    "METHOD",
    "GrabCutPredictor",
    "import_cv2",
    "seed_mask",
]

METHOD = "opencv-grabcut"
DEFAULT_RADIUS = 5
DEFAULT_ITERATIONS = 3
CARRY = ("models", "mask", "none")
_GMM_COMPONENTS = 5  # OpenCV's GrabCut GMMs
INSTALL_HINT = "--method opencv-grabcut needs OpenCV: pip install samref-jax[opencv]"

# cv2.GC_* values (fixed by OpenCV's API), so the seeding rule needs no cv2 import.
GC_BGD, GC_FGD, GC_PR_BGD, GC_PR_FGD = 0, 1, 2, 3


def import_cv2() -> Any:
    """The ``cv2`` module, or ``ImportError`` with :data:`INSTALL_HINT` as its message."""
    try:
        import cv2
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return cv2


def _disk_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    inside = dy * dy + dx * dx <= radius * radius
    return dy[inside], dx[inside]


def seed_mask(
    mask: np.ndarray, clicks: list[tuple[int, int, bool]], radius: int = DEFAULT_RADIUS
) -> np.ndarray:
    """Draw every click as a disk into ``mask`` (``uint8[H, W]`` GrabCut labels), in place.

    A click ``(y, x, positive)`` labels the pixels within Euclidean distance ``radius`` of it
    (clipped to the image) ``GC_FGD`` (1) if positive, else ``GC_BGD`` (0); later clicks
    overwrite earlier ones. Returns ``mask``.
    """
    h, w = mask.shape
    dy, dx = _disk_offsets(radius)
    for y, x, positive in clicks:
        ys, xs = dy + int(y), dx + int(x)
        keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        mask[ys[keep], xs[keep]] = GC_FGD if positive else GC_BGD
    return mask


class GrabCutPredictor:
    """Click predictor running OpenCV GrabCut with click disks as seeds (module docstring).

    Args:
      radius: click disk radius in image pixels (at least 1).
      iterations: GrabCut iterations after each click.
      carry: what carries over between the clicks of a sample: ``"models"`` (label mask and
        GMMs), ``"mask"`` (label mask; GMMs refitted) or ``"none"`` (module docstring).
    """

    def __init__(
        self,
        radius: int = DEFAULT_RADIUS,
        iterations: int = DEFAULT_ITERATIONS,
        carry: str = "none",
    ) -> None:
        if carry not in CARRY:
            raise ValueError(f"carry must be one of {', '.join(CARRY)}, got {carry!r}")
        if int(radius) < 1:
            raise ValueError(f"click disk radius must be at least 1 pixel, got {radius}")
        if int(iterations) < 1:
            raise ValueError(f"GrabCut iterations must be at least 1, got {iterations}")
        self.cv2 = import_cv2()
        self.radius = int(radius)
        self.iterations = int(iterations)
        self.carry = carry
        self._image: np.ndarray | None = None
        self.reset()

    def set_image(self, image: np.ndarray) -> None:
        """Take the RGB ``uint8[H, W, 3]`` image (kept as contiguous BGR) and reset."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
        self._image = np.ascontiguousarray(image[:, :, ::-1], dtype=np.uint8)
        self.reset()

    def reset(self) -> None:
        """Forget the clicks, the label mask and the GMMs; reseed OpenCV's generator."""
        self.clicks: list[tuple[int, int, bool]] = []
        self.mask = (
            None
            if self._image is None
            else np.full(self._image.shape[:2], GC_PR_BGD, dtype=np.uint8)
        )
        self.bgd_model = np.zeros((1, 65), dtype=np.float64)
        self.fgd_model = np.zeros((1, 65), dtype=np.float64)
        self.initialised = False
        self.cv2.setRNGSeed(0)

    def click(self, x: int, y: int, positive: bool = True) -> np.ndarray:
        """Add a click at pixel ``(x, y)``, rerun GrabCut, return the ``bool[H, W]`` mask."""
        if self._image is None or self.mask is None:
            raise RuntimeError("call set_image before click")
        self.clicks.append((int(y), int(x), bool(positive)))
        if self.carry == "none":
            self.mask[:] = GC_PR_BGD
        seed_mask(self.mask, self.clicks, self.radius)
        fg = (self.mask == GC_FGD) | (self.mask == GC_PR_FGD)
        if min(np.count_nonzero(fg), fg.size - np.count_nonzero(fg)) < _GMM_COMPONENTS:
            return fg  # too few samples for the GMMs (e.g. no positive click yet)
        keep = self.carry == "models" and self.initialised
        mode = self.cv2.GC_EVAL if keep else self.cv2.GC_INIT_WITH_MASK
        self.mask, self.bgd_model, self.fgd_model = self.cv2.grabCut(
            self._image,
            self.mask,
            None,
            self.bgd_model,
            self.fgd_model,
            self.iterations,
            mode,
        )
        self.initialised = True
        return (self.mask == GC_FGD) | (self.mask == GC_PR_FGD)

    def metadata(self) -> dict:
        """What identifies this peer's runs (for ``metrics.json``)."""
        return {
            "method": METHOD,
            "grabcut_radius": self.radius,
            "grabcut_iterations": self.iterations,
            "grabcut_carry": self.carry,
            "opencv": self.cv2.__version__,
        }
