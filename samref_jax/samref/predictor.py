"""`SamRefPredictor`: click-by-click SAM-REF on one image.

Example:
  >>> import numpy as np
  >>> from samref_jax import SamRefPredictor
  >>> p = SamRefPredictor.from_checkpoint("tiny", mode="full")  # the bundled model
  >>> p.set_image(np.zeros((96, 128, 3), np.uint8))  # HxWx3 uint8 RGB; embedded once
  >>> out = p.click(60, 40)           # x, y in original pixels; positive by default
  >>> out.mask.shape, out.mask.dtype, len(out.window)  # window: (x0, y0, x1, y1)
  ((96, 128), dtype('bool'), 4)
  >>> out = p.click(20, 70, positive=False)
  >>> [positive for _, _, positive in p.clicks]
  [True, False]
  >>> _ = p.undo(); p.reset(); p.clicks
  []

Every click runs one jit-compiled step with `max_clicks` padded click slots, so clicking never
recompiles. Coordinates are (x, y) pixels of the original image. A box
(``set_box(x0, y0, x1, y1)``, one round) or a mask to correct (``set_mask(mask)``) may come
before the clicks.

The per-image work can run ahead of the clicks: ``prepare_image`` computes an image's embedding
without touching the current image and clicks (from any thread), and ``set_image`` accepts
its result:

  >>> nxt = p.prepare_image(np.zeros((64, 64, 3), np.uint8))  # e.g. in a background thread
  >>> p.set_image(nxt); p.click(10, 10).mask.shape
  (64, 64)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from samref_jax.host import tune_malloc
from samref_jax.sam.transforms import (
    apply_boxes,
    apply_coords,
    as_rgb_uint8,
    frame_to_original,
    normalize_and_pad,
    resize_longest_side,
)
from samref_jax.samref.config import MODES, sam_config_from
from samref_jax.samref.io import load_samref, untrained_refiners
from samref_jax.samref.model import ClickOutputs, ClickState, ImageContext, SamRef, detail_scale
from samref_jax.samref.prompts import check_box, check_mask, mask_to_frame_logits


@dataclasses.dataclass
class ClickResult:
    """Result of one click, in original-image pixels.

    mask: (H, W) bool final mask; logits: (H, W) float32 final logits;
    sam_mask / global_mask: (H, W) bool masks after SAM and after GlobalDiff;
    window: (x0, y0, x1, y1) PatchDiff window (None unless mode "full"); score: SAM's IoU.
    """

    mask: np.ndarray
    logits: np.ndarray
    sam_mask: np.ndarray
    global_mask: np.ndarray
    window: tuple[float, float, float, float] | None
    score: float


@dataclasses.dataclass(frozen=True)
class _Click:
    """One entry of the undo history: the clicks so far (original pixels), the model's
    ``ClickState`` after them (feedback included) and their result; ``box``: the box prompt
    (x0, y0, x1, y1) in original pixels under them (``set_box``), or None."""

    coords: list[tuple[float, float]]
    labels: list[int]
    state: ClickState
    result: ClickResult
    box: tuple[float, float, float, float] | None = None


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """One image's per-click-independent work, from `SamRefPredictor.prepare_image`.

    context: the image's ``ImageContext`` (frame (1, F, F, 3), SAM's embedding (1, S, S, C),
    the per-image caches); original_size / input_size: (H, W) of the image and of its resized
    copy inside the frame; params: the parameters it was computed with.
    """

    context: ImageContext
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    params: Any

    @property
    def frame_image(self) -> jax.Array:
        return self.context.image

    @property
    def embedding(self) -> jax.Array:
        return self.context.embedding


def _to_original(
    logits: jax.Array, input_hw: tuple[int, int], original_hw: tuple[int, int]
) -> np.ndarray:
    """(B, F, F) frame logits -> (B, H, W): crop the padding, torch-bilinear resize (compiled
    tiles shared by every image size: `frame_to_original`)."""
    return frame_to_original(logits, input_hw, original_hw)


# Distinct frame maps a mode produces (see SamRef.click): final, SAM, GlobalDiff.
_NUM_MAPS = {"sam": 1, "global": 2, "full": 3}


class SamRefPredictor:
    """Interactive SAM-REF on one image at a time. `mode`: "sam", "global" or "full"."""

    def __init__(
        self,
        params: dict[str, Any],
        config: ml_collections.ConfigDict,
        mode: str = "full",
        dtype: Any = jnp.float32,
    ) -> None:
        tune_malloc()  # XLA:CPU's scratch blocks from the heap, not fresh pages (host.py)
        self.config = ml_collections.FrozenConfigDict(config)
        self.sam_config = sam_config_from(config)
        self.model = model = SamRef(self.config, dtype)

        @jax.jit
        def prepare(params, image, valid_hw, radius, detail):
            # The per-image work: SAM's embedding and the per-image caches (ImageContext).
            return model.apply(
                {"params": params},
                image,
                valid_hw,
                radius,
                detail_image=detail,
                method=SamRef.prepare,
            )

        self._prepare_fn = prepare
        self._empty_state = ClickState.empty(self.config)  # the same for every image
        self.reset_image()
        self.params = params
        self.set_mode(mode)
        self._steps: dict[str, Any] = {}

    @classmethod
    def from_checkpoint(
        cls, name_or_path: str | os.PathLike, mode: str = "full", dtype: Any = jnp.float32
    ) -> SamRefPredictor:
        """A checkpoint directory (SAM-REF, or SAM-only from convert_weights.py) or a bundled
        name (`tiny`, `tiny-sam`)."""
        params, config, meta = load_samref(name_or_path)
        predictor = cls(params, config, mode=mode, dtype=dtype)
        predictor.untrained_refiners = untrained_refiners(meta)
        predictor._warn_untrained(name_or_path)
        return predictor

    untrained_refiners = False  # from_checkpoint: the checkpoint's refiners were never trained

    def _warn_untrained(self, name: Any = "this checkpoint") -> None:
        if self.untrained_refiners and self.mode != "sam":
            warnings.warn(
                f"{name}: the refiners of this checkpoint were never trained (it was trained in "
                f"'sam' mode), so mode {self.mode!r} runs untrained GlobalDiff/PatchDiff; use "
                "mode 'sam' with it",
                UserWarning,
                stacklevel=3,
            )

    @property
    def params(self) -> dict[str, Any]:
        return self._params

    @params.setter
    def params(self, params: dict[str, Any]) -> None:
        """New parameters; a current image is re-embedded with them (its clicks are kept)."""
        self._params = params
        if self.context is not None:
            c, sizes = self.context, (self.original_size, self.input_size)
            self._use(self._prepare_frame(c.image, c.detail_image, *sizes))

    def _prepare_frame(
        self,
        frame: jax.Array,
        detail: jax.Array | None,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> PreparedImage:
        """frame (1, F, F, 3) and PatchDiff's detail image (1, kF, kF, 3) or None -> the
        image's ImageContext."""
        f = self.sam_config.img_size
        radius = float(self.config.click_radius) * f / max(original_size)
        ctx = self._prepare_fn(
            self._params,
            frame,
            jnp.asarray([input_size], jnp.int32),
            jnp.asarray([radius], jnp.float32),
            detail,
        )
        # Wait for it: the embedding is the expensive step, and callers time this.
        jax.block_until_ready(ctx)
        return PreparedImage(ctx, original_size, input_size, self._params)

    def _use(self, prepared: PreparedImage) -> None:
        self.context = prepared.context
        self.original_size = prepared.original_size
        self.input_size = prepared.input_size

    @property
    def frame_image(self) -> jax.Array | None:
        """(1, F, F, 3) the current image's normalised, padded frame (None: no image)."""
        return None if self.context is None else self.context.image

    @property
    def embedding(self) -> jax.Array | None:
        """(1, S, S, C) the current image's SAM embedding (None: no image)."""
        return None if self.context is None else self.context.embedding

    # ----------------------------------------------------------------------------- state
    def set_mode(self, mode: str) -> None:
        """Switches between "sam", "global" and "full" (keeps the image embedding)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        before = getattr(self, "mode", "sam")
        self.mode = mode
        if mode != "sam" and before == "sam":
            self._warn_untrained()

    def fork(self, mode: str | None = None) -> SamRefPredictor:
        """Another click loop on the same image: shares the embedding, the cached per-image
        inputs, the parameters and the compiled steps; has its own clicks and mode.

        Forks are independent, so several can click at the same time from different threads
        (the evaluator runs its modes this way: one fork's host work overlaps another's device
        step). A new image or new parameters on one fork do not reach the others.
        """
        other = copy.copy(self)
        other._history = list(self._history)
        other.set_mode(self.mode if mode is None else mode)
        return other

    def reset_image(self) -> None:
        self.context: ImageContext | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self._history: list[_Click] = []

    def prepare_image(self, image: np.ndarray) -> PreparedImage:
        """The per-image work for `image` (SAM's embedding, GlobalDiff's inputs), returned
        instead of set: this predictor's image and clicks are untouched, so it may run in another
        thread while this predictor clicks on its current image (the evaluator embeds the next
        image this way).

        Args:
          image: (H, W, 3) uint8 RGB; grey, RGBA and 16-bit images are converted.

        Returns:
          A `PreparedImage` for `set_image`.
        """
        image = as_rgb_uint8(image)
        f = self.sam_config.img_size
        resized = resize_longest_side(image, f)
        frame = jnp.asarray(normalize_and_pad(resized, self.sam_config))
        detail = None
        k = detail_scale(self.config)
        if k > 1:  # PatchDiff's image source: the image at k x the frame, from the original
            big = resize_longest_side(image, k * f)
            detail = jnp.asarray(normalize_and_pad(big, self.sam_config, k * f))
        original = (int(image.shape[0]), int(image.shape[1]))
        input_size = (int(resized.shape[0]), int(resized.shape[1]))
        return self._prepare_frame(frame, detail, original, input_size)

    def set_image(self, image: np.ndarray | PreparedImage) -> None:
        """HxWx3 uint8 RGB (grey, RGBA and 16-bit images are converted), or the result of
        `prepare_image` (no work left to do). Clears the clicks."""
        if not isinstance(image, PreparedImage):
            image = self.prepare_image(image)
        elif image.params is not self._params:  # prepared before new parameters were set
            c, sizes = image.context, (image.original_size, image.input_size)
            image = self._prepare_frame(c.image, c.detail_image, *sizes)
        self._use(image)
        self.reset()

    def reset(self) -> None:
        """Removes all clicks (keeps the image and its embedding)."""
        self._history = []

    def undo(self) -> ClickResult | None:
        """Removes the last click; returns the result now current (None when no click left)."""
        if self._history:
            self._history.pop()
        return self._history[-1].result if self._history else None

    @property
    def clicks(self) -> list[tuple[float, float, bool]]:
        """[(x, y, positive)] in original pixels."""
        if not self._history:
            return []
        st = self._history[-1]
        return [(x, y, lab == 1) for (x, y), lab in zip(st.coords, st.labels, strict=True)]

    # ------------------------------------------------------------------------------ click
    def _step_fn(self, mode: str, box: bool = False):
        """The jitted click step of `mode`: compiled once, whatever the image size. ``box``:
        the box step instead (``xy`` is the (1, 4) frame box, ``label`` unused)."""
        key = f"{mode}:box" if box else mode
        if key not in self._steps:
            model = self.model

            @jax.jit
            def step(params, ctx: ImageContext, state: ClickState, xy, label):
                state = state.add_box(xy) if box else state.add_click(xy, label)
                out: ClickOutputs
                out, state = model.apply({"params": params}, ctx, state, mode, method=SamRef.click)
                # Only the distinct maps (final, then SAM, then GlobalDiff): in "sam" mode all
                # three are SAM's logits, in "global" the final one is GlobalDiff's.
                distinct = [out.final_logits, out.sam_logits, out.global_logits][: _NUM_MAPS[mode]]
                maps = jnp.stack(distinct, 1)
                return state, maps[0], out.window[0], out.score[0]

            self._steps[key] = step
        return self._steps[key]

    def click(self, x: float, y: float, positive: bool = True) -> ClickResult:
        """Adds a click at (x, y) original pixels and returns the new masks."""
        if self.context is None:
            raise RuntimeError("set an image with .set_image(...) before clicking")
        h, w = self.original_size
        if not (np.isfinite(x) and np.isfinite(y)) or not (0 <= x < w and 0 <= y < h):
            raise ValueError(
                f"click ({x}, {y}) is outside the image: x must be in [0, {w}) and y in [0, {h})"
            )
        n_max = int(self.config.max_clicks)
        prev = self._history[-1] if self._history else None
        coords = (prev.coords if prev else []) + [(float(x), float(y))]
        labels = (prev.labels if prev else []) + [1 if positive else 0]
        box = prev.box if prev else None
        if len(coords) + (2 if box else 0) > n_max:
            raise ValueError(
                f"at most {n_max} clicks per object (config max_clicks; a box takes two)"
            )
        f = self.sam_config.img_size
        state = prev.state if prev else self._empty_state
        xy = apply_coords(np.array([[float(x), float(y)]]), (h, w), f)
        step = self._step_fn(self.mode)
        state, maps, window, score = step(
            self.params, self.context, state, jnp.asarray(xy, jnp.float32), jnp.asarray(labels[-1:])
        )
        result = self._result(maps, window, score)
        self._history.append(_Click(coords, labels, state, result, box))
        return result

    def _result(self, maps: jax.Array, window: jax.Array, score: jax.Array) -> ClickResult:
        """A step's frame maps (M, F, F), window (4,) and score -> the ClickResult in original
        pixels."""
        h, w = self.original_size
        orig = np.asarray(_to_original(maps, self.input_size, self.original_size))
        win = None
        if self.mode == "full":
            sx = w / self.input_size[1]
            sy = h / self.input_size[0]
            wx0, wy0, wx1, wy1 = (float(v) for v in np.asarray(window))
            win = (wx0 * sx, wy0 * sy, wx1 * sx, wy1 * sy)
        return ClickResult(
            mask=orig[0] > 0,
            logits=orig[0],
            sam_mask=orig[min(1, len(orig) - 1)] > 0,
            global_mask=(orig[2] if len(orig) == 3 else orig[0]) > 0,
            window=win,
            score=float(score),
        )

    # ------------------------------------------------------------------ box, initial mask
    @property
    def box(self) -> tuple[float, float, float, float] | None:
        """The box prompt (x0, y0, x1, y1) in original pixels, or None."""
        return self._history[-1].box if self._history else None

    def set_box(self, x0: float, y0: float, x1: float, y1: float) -> ClickResult:
        """A box prompt (original pixels, SAM's XYXY) before any click; runs one round.

        The box fills two of the ``max_clicks`` slots (SAM's box encoding: corners labelled 2
        and 3, ``ClickState.add_box``); SAM answers with its single-mask output; the refiners
        draw no disks for it and PatchDiff's window is centred on the box. Later clicks add to
        it. A second ``set_box`` before any click replaces the box (an initial mask from
        ``set_mask`` is kept under it); after clicks it is a ValueError (``reset()`` or
        ``undo()`` them first). ``undo()`` removes the box.

        Raises:
          ValueError: the box is outside the image or degenerate (x1 <= x0 or y1 <= y0).
        """
        if self.context is None:
            raise RuntimeError("set an image with .set_image(...) before giving a box")
        box = check_box((x0, y0, x1, y1), self.original_size)
        if self.clicks:
            raise ValueError("a box comes before the clicks: reset() or undo() them first")
        history = self._history[:-1] if self.box is not None else self._history
        if int(self.config.max_clicks) < 2:
            raise ValueError("a box needs two click slots (config max_clicks >= 2)")
        state = history[-1].state if history else self._empty_state
        frame_box = apply_boxes(np.asarray(box), self.original_size, self.sam_config.img_size)
        step = self._step_fn(self.mode, box=True)
        state, maps, window, score = step(
            self.params,
            self.context,
            state,
            jnp.asarray(frame_box.reshape(1, 4), jnp.float32),
            jnp.zeros((1,), jnp.int32),
        )
        result = self._result(maps, window, score)
        self._history = [*history, _Click([], [], state, result, box)]
        return result

    def set_mask(self, mask: np.ndarray) -> ClickResult:
        """Starts over from a mask to correct (the clicks and the box are cleared).

        The mask becomes the feedback of a round that never ran (``ClickState.with_mask``):
        the refiners' previous logits are +/- ``-first_prev_logit`` (20 by default) inside and
        outside it, resized into the frame as the image is, the padding negative; SAM's
        ``mask_input`` is the same logits average-pooled to its low-res grid. The next click
        then corrects it (SAM's single-mask output, as after any click). No model runs here.

        Args:
          mask: (H, W) of the image, nonzero = object.

        Returns:
          The ClickResult now current: the mask itself (``logits`` +/- the constant, no
          window, score NaN); ``undo()`` removes it.
        """
        if self.context is None:
            raise RuntimeError("set an image with .set_image(...) before giving a mask")
        m = check_mask(mask, self.original_size)
        value = -float(self.config.first_prev_logit)
        frame = mask_to_frame_logits(m, self.input_size, self.sam_config.img_size, value)
        state = self._empty_state.with_mask(jnp.asarray(frame)[None])
        logits = np.where(m, value, -value).astype(np.float32)
        result = ClickResult(m, logits, m, m, None, float("nan"))
        self._history = [_Click([], [], state, result)]
        return result
