"""`SamPredictor`: the official predictor's API and semantics, on the Flax port.

Example:
  >>> from samref_jax import load_sam, SamPredictor
  >>> predictor = SamPredictor(load_sam("checkpoints/vit_b"))          # doctest: +SKIP
  >>> predictor.set_image(image)                                       # doctest: +SKIP
  >>> masks, scores, low_res = predictor.predict(
  ...     point_coords=np.array([[500, 375]]), point_labels=np.array([1]))  # doctest: +SKIP

Shapes: masks (C, H, W) bool (or float logits with `return_logits`), scores (C,), low-res
logits (C, 256, 256), C = 3 with `multimask_output` else 1. Coordinates are (x, y) in the
original image. The encoder is compiled once per model; the prompt path once per padded prompt
size (2, 4, 8, ... slots), so successive clicks do not recompile; the resize to the image's
size runs in a bounded set of compiled tiles (`frame_to_original`), so new image sizes do not
recompile either.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from samref_jax.host import tune_malloc
from samref_jax.sam.build import SamModel
from samref_jax.sam.mask_decoder import select_masks
from samref_jax.sam.model import Sam
from samref_jax.sam.transforms import (
    apply_boxes,
    apply_coords,
    as_rgb_uint8,
    frame_to_original,
    normalize_and_pad,
    resize_longest_side,
    upscale_to_frame,
)

PROMPT_BUCKETS = (2, 4, 8, 16, 32, 64, 128)
# Padded number of prompt sets of one `predict_batch` call (coarse: 2..8 sets share a compile);
# larger batches run in chunks of the last size (each chunk one call of the same function).
BATCH_BUCKETS = (1, 8, 16, 32, 64)


def batch_bucket(n: int) -> int:
    """Smallest padded batch size holding n prompt sets (n <= BATCH_BUCKETS[-1])."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"at most {BATCH_BUCKETS[-1]} prompt sets per call, got {n}")


def prompt_bucket(n: int) -> int:
    """Smallest padded prompt size holding n slots."""
    for b in PROMPT_BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"at most {PROMPT_BUCKETS[-1]} prompt slots are supported, got {n}")


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(module: Sam, params, images):
    return module.apply({"params": params}, images, method=Sam.embed_image)


@functools.partial(jax.jit, static_argnums=(0,))
def _dense_pe(module: Sam, params):
    return module.apply({"params": params}, method=Sam.dense_pe)


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(module: Sam, params, embedding, coords, labels, mask_input, has_mask, image_pe):
    return module.apply(
        {"params": params},
        embedding,
        coords,
        labels,
        mask_input,
        has_mask,
        image_pe,
        method=Sam.predict_masks,
    )


@functools.partial(jax.jit, static_argnums=(2, 3))
def _finish(masks, iou, multimask_output, config):
    """Output slice and upscaling to the frame in one call, whatever the image size: frame
    logits (C, F, F), scores (C,), low-res logits (C, 4S, 4S). The rest of SAM's
    postprocessing (crop, resize to the image's size) is `frame_to_original`, whose compiled
    programs do not depend on the image size either."""
    masks, iou = select_masks(masks, iou, multimask_output)
    return upscale_to_frame(masks, config)[0], iou[0], masks[0]


@functools.partial(jax.jit, static_argnums=(2,))
def _row_to_frame(low_res: jax.Array, i: jax.Array, config) -> jax.Array:
    """Row i of (B, C, 4S, 4S) low-res logits upscaled to the frame: (C, F, F), one program for
    every i."""
    return upscale_to_frame(jax.lax.dynamic_index_in_dim(low_res, i, keepdims=False), config)


@functools.partial(jax.jit, static_argnums=(0, 8))
def _predict_batch(
    module: Sam,
    params,
    embedding,
    coords,
    labels,
    mask_input,
    has_mask,
    image_pe,
    multimask_output,
):
    """`_decode` of B prompt sets on one image embedding and the output slice of each row, in
    one compiled call (once per padded batch size and prompt size); `_row_to_frame` and
    `frame_to_original` then take each row to the image's size.

    embedding (1, S, S, D); coords (B, K, 2); labels (B, K); mask_input (B, 4S, 4S); has_mask
    (B,) -> scores (B, C), low-res logits (B, C, 4S, 4S).
    """
    masks, iou = _decode(module, params, embedding, coords, labels, mask_input, has_mask, image_pe)

    def finish_row(m, i):
        m, i = select_masks(m, i, multimask_output)
        return i[0], m[0]

    return jax.vmap(finish_row)(masks[:, None], iou[:, None])


class SamPredictor:
    """Same semantics and shapes as `segment_anything.SamPredictor`: `predict` takes one prompt
    set, `predict_batch` N sets in one call (the official `predict_torch`)."""

    def __init__(self, sam_model: SamModel) -> None:
        tune_malloc()  # XLA:CPU's scratch blocks from the heap, not fresh pages (host.py)
        self.model = sam_model
        # The decoder's positional encoding depends on the parameters only: computed once.
        self._image_pe = _dense_pe(sam_model.module, sam_model.params)
        self.reset_image()

    @property
    def config(self):
        return self.model.config

    def reset_image(self) -> None:
        self.features: jax.Array | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.is_image_set = False

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """HxWx3 uint8 RGB (grey/RGBA/16-bit converted). Computes the embedding once."""
        image = as_rgb_uint8(image, image_format)
        resized = resize_longest_side(image, self.config.img_size)
        x = normalize_and_pad(resized, self.config)
        # Computed before returning (as the official predictor does): callers time set_image.
        self.features = jax.block_until_ready(
            _embed(self.model.module, self.model.params, jnp.asarray(x))
        )
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.input_size = (int(resized.shape[0]), int(resized.shape[1]))
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        """(1, 256, 64, 64) as the official predictor returns it (NCHW)."""
        self._require_image()
        return np.asarray(self.features).transpose(0, 3, 1, 2)

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("an image must be set with .set_image(...) before this call")

    def encode_prompts(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Original-image prompts -> padded (1, N, 2) frame coords and (1, N) labels."""
        coords: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied with point_coords")
            pc = np.asarray(point_coords, np.float64).reshape(-1, 2)
            pl = np.asarray(point_labels).reshape(-1)
            if len(pc) != len(pl):
                raise ValueError(f"{len(pc)} points but {len(pl)} labels")
            if not np.isfinite(pc).all():
                raise ValueError("point_coords must be finite numbers (got NaN or Inf)")
            if not np.isin(pl, (0, 1)).all():
                raise ValueError("point labels must be 0 (negative) or 1 (positive)")
            coords.append(apply_coords(pc, self.original_size, self.config.img_size))
            labels.append(pl.astype(np.int32))
        if box is not None:
            b = np.asarray(box, np.float64).reshape(-1)
            if b.shape != (4,):
                raise ValueError(f"box must be XYXY with 4 values, got shape {np.shape(box)}")
            if not np.isfinite(b).all():
                raise ValueError("box must hold finite numbers (got NaN or Inf)")
            coords.append(apply_boxes(b, self.original_size, self.config.img_size).reshape(2, 2))
            labels.append(np.array([2, 3], np.int32))
        n = sum(len(lab) for lab in labels)
        size = prompt_bucket(n + 1)
        out_c = np.zeros((1, size, 2), np.float32)
        out_l = np.full((1, size), -1, np.int32)
        if n:
            out_c[0, :n] = np.concatenate(coords).astype(np.float32)
            out_l[0, :n] = np.concatenate(labels)
        return out_c, out_l

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns masks (C, H, W), scores (C,), low-res logits (C, 256, 256) as NumPy."""
        self._require_image()
        coords, labels = self.encode_prompts(point_coords, point_labels, box)
        low = self.config.low_res_mask_size
        if mask_input is not None:
            m = np.asarray(mask_input, np.float32).reshape(-1, low, low)[:1]
            has_mask = np.ones((1,), bool)
        else:
            m = np.zeros((1, low, low), np.float32)
            has_mask = np.zeros((1,), bool)
        masks, iou = _decode(
            self.model.module,
            self.model.params,
            self.features,
            jnp.asarray(coords),
            jnp.asarray(labels),
            jnp.asarray(m),
            jnp.asarray(has_mask),
            self._image_pe,
        )
        frame, scores, low_res = _finish(masks, iou, bool(multimask_output), self.config)
        full = self._to_original(frame, return_logits)
        return full, np.asarray(scores), np.asarray(low_res)

    def _to_original(self, frame: jax.Array, return_logits: bool) -> np.ndarray:
        """(C, F, F) frame logits -> (C, H, W) logits, or masks (logits > 0)."""
        full = frame_to_original(frame, self.input_size, self.original_size)
        return full if return_logits else full > 0.0

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """N prompt sets on the current image in one compiled call: the official predictor's
        `predict_torch`, but in original-image coordinates like :meth:`predict`.

        point_coords (N, K, 2) (x, y) original-image pixels with point_labels (N, K) in {0, 1};
        boxes (N, 4) XYXY original-image pixels; mask_input (N, 1, 4S, 4S) low-res logits (a
        previous call's low-res output), used in every row. Row i equals :meth:`predict` on row
        i's prompts. Returns masks (N, C, H, W) bool (float logits with `return_logits`),
        scores (N, C) and low-res logits (N, C, 4S, 4S) as NumPy, C = 3 with
        `multimask_output` else 1. N is padded to a `BATCH_BUCKETS` size, so batches of
        different sizes share a compile; N above the largest runs in chunks of that size.
        """
        self._require_image()
        sizes: dict[str, int] = {}
        pc = pl = bx = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied with point_coords")
            pc = np.asarray(point_coords, np.float64)
            pl = np.asarray(point_labels)
            if pc.ndim != 3 or pc.shape[-1] != 2:
                raise ValueError(f"point_coords must be (N, K, 2), got shape {pc.shape}")
            if pl.shape != pc.shape[:2]:
                raise ValueError(f"point_labels must be (N, K) = {pc.shape[:2]}, got {pl.shape}")
            sizes["point_coords"] = pc.shape[0]
        elif point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        if boxes is not None:
            bx = np.asarray(boxes, np.float64)
            if bx.ndim != 2 or bx.shape[-1] != 4:
                raise ValueError(f"boxes must be (N, 4) XYXY, got shape {bx.shape}")
            sizes["boxes"] = bx.shape[0]
        low = self.config.low_res_mask_size
        m = None
        if mask_input is not None:
            m = np.asarray(mask_input, np.float32)
            if m.ndim != 4 or m.shape[1:] != (1, low, low):
                raise ValueError(f"mask_input must be (N, 1, {low}, {low}), got shape {m.shape}")
            sizes["mask_input"] = m.shape[0]
        if not sizes:
            raise ValueError("predict_batch needs point_coords, boxes or mask_input")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the prompts disagree on N: {sizes}")
        n = next(iter(sizes.values()))
        if n == 0:
            raise ValueError("predict_batch needs at least one prompt set (N = 0)")
        rows = [
            self.encode_prompts(
                None if pc is None else pc[i],
                None if pl is None else pl[i],
                None if bx is None else bx[i],
            )
            for i in range(n)
        ]
        coords = np.concatenate([r[0] for r in rows])
        labels = np.concatenate([r[1] for r in rows])
        if m is None:
            masks_in = np.zeros((n, low, low), np.float32)
            has_mask = np.zeros((n,), bool)
        else:
            masks_in = m[:, 0]
            has_mask = np.ones((n,), bool)
        outs = []
        chunk = BATCH_BUCKETS[-1]
        for start in range(0, n, chunk):
            part = slice(start, min(start + chunk, n))
            size = part.stop - part.start
            pad = batch_bucket(size) - size

            def padded(x: np.ndarray, pad: int = pad, part: slice = part) -> jax.Array:
                # Padding rows repeat the chunk's first row (a valid prompt); they are dropped.
                x = x[part]
                return jnp.asarray(np.concatenate([x, np.repeat(x[:1], pad, axis=0)]))

            out = _predict_batch(
                self.model.module,
                self.model.params,
                self.features,
                padded(coords),
                padded(labels),
                padded(masks_in),
                padded(has_mask),
                self._image_pe,
                bool(multimask_output),
            )
            scores, low_res = out
            full = [
                self._to_original(_row_to_frame(low_res, i, self.config), return_logits)
                for i in range(size)
            ]
            outs.append([np.stack(full), np.asarray(scores)[:size], np.asarray(low_res)[:size]])
        full, scores, low_res = (np.concatenate(parts) for parts in zip(*outs, strict=True))
        return full, scores, low_res
