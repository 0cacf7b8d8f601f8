"""Training input pipeline: Grain over the TFDS ArrayRecord source.

See docs/design.md, 'TFDS without TensorFlow'.

``MapDataset.source(ArrayRecordDataSource)`` (training indices) -> shuffle (per epoch, seeded)
-> repeat -> ``random_map(augment)`` (random scale, crop, flip, colour jitter, resize-and-pad to
the frame, first click inside the object) -> batch (this process's share of the global batch)
-> this process's batches -> ``to_iter_dataset`` (optionally ``mp_prefetch`` worker processes).

Several processes: global batch ``g`` is the concatenation, in process order, of the local
batches ``g * P + p`` of the one shuffled stream, and process ``p`` reads (and augments) only its
own ones (``batched[p::P]``). The global batches are therefore the same for any number of
processes and devices per process with the same global batch size (what a run on one process
would see), and every process's iterator state is the same step counter.

``data.use_cached_embeddings`` (a frozen encoder): the source is the embedding cache of the
config (``embedding_cache.py``, built by ``python -m samref_jax.training.cache_embeddings``) and
the augmentation step is replaced by picking one of the instance's cached views at random (the
same seeded ``random_map``); every example then also carries ``embedding`` (S, S, D), which the
step uses instead of running the encoder.

Everything is a pure function of (seed, position), so the iterator is deterministic and its
``get_state()`` (a small dict, stored as JSON in the training checkpoint) restores it exactly.

A training example (numpy, frame side F)::

    image uint8 (F, F, 3)   resized image at the top-left, zeros elsewhere
    gt int8 (F, F)          1 object, 0 background, -1 ignore and padding
    valid_hw int32 (2,)     unpadded (h, w)
    first_click int32 (2,)  (y, x) inside the object
    radius float32 ()       click-disk radius in frame pixels

Example:
  >>> it = make_train_iterator(config, data_dir)                       # doctest: +SKIP
  >>> batch = next(it); it.get_state()                                 # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage

from samref_jax.paths import as_path
from samref_jax.samref.config import sam_config_from


def default_manual_dir(name: str) -> str:
    """``$SAMREF_DATA_DIR/<name>`` (no default: library code never guesses a path)."""
    root = os.environ.get("SAMREF_DATA_DIR")
    if not root:
        raise ValueError(
            f"set --config.data.manual_dir to the {name} folder or SAMREF_DATA_DIR to its parent"
        )
    return str(as_path(root) / name)  # epath: gs://... kept verbatim


def prepare_source(config: ml_collections.ConfigDict, data_dir: str | Path) -> Any:
    """Prepares ``data.name`` (once) under ``data_dir``; returns its random-access source."""
    from samref_jax.data.tfds_builders import grain_source, prepare

    d = config.data
    manual = d.manual_dir or default_manual_dir(d.name)
    data_dir = as_path(data_dir)  # epath: gs://... kept verbatim
    data_dir.mkdir(parents=True, exist_ok=True)
    prepare(d.name, manual, data_dir)
    return grain_source(d.name, data_dir, d.split or None)


def split_indices(n: int, heldout_every: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: index i is held out iff heldout_every > 0 and i % k == 0."""
    idx = np.arange(n)
    if heldout_every and heldout_every > 0:
        held = idx % int(heldout_every) == 0
        return idx[~held], idx[held]
    return idx, idx[:0]


# ------------------------------------------------------------------------------ augmentation


def _resize(arr: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    im = Image.fromarray(arr)
    return np.asarray(im.resize((hw[1], hw[0]), Image.NEAREST if nearest else Image.BILINEAR))


def first_click(obj: np.ndarray, rng: np.random.Generator, frac: float) -> tuple[int, int]:
    """(y, x) of a random object pixel whose distance to the background is >= frac * max."""
    dt = ndimage.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
    m = dt.max()
    ys, xs = np.nonzero(dt >= max(frac * m, min(m, 1.0)))
    k = int(rng.integers(len(ys)))
    return int(ys[k]), int(xs[k])


def augment(
    sample: dict, rng: np.random.Generator, frame: int, d: Any, click_radius: float
) -> dict:
    """One training example from a ``{"image", "gt"}`` sample (module docstring)."""
    image = np.asarray(sample["image"])
    gt = np.asarray(sample["gt"]).astype(np.int8)
    h0, w0 = gt.shape
    base = frame / max(h0, w0)
    zoom = tuple(d.get("zoom_in", ()) or ())
    oy, ox = np.nonzero(gt == 1)
    for attempt in range(4):
        scale = base * (float(rng.uniform(d.scale_min, d.scale_max)) if attempt < 3 else 1.0)
        if zoom and len(oy) and attempt < 3:
            # Object-centric zoom: the object's longer box side becomes zoom[0..1] x frame
            # (not below scale_min x the whole-image fit, not above the native resolution).
            side = max(oy.max() - oy.min() + 1, ox.max() - ox.min() + 1)
            target = float(rng.uniform(zoom[0], zoom[1])) * frame / side
            scale = float(np.clip(target, base * d.scale_min, max(1.0, base * d.scale_min)))
        h, w = max(1, int(round(h0 * scale))), max(1, int(round(w0 * scale)))
        img = _resize(image, (h, w), nearest=False)
        g = _resize(gt.view(np.uint8), (h, w), nearest=True).view(np.int8)
        # Crop a frame-sized window (when larger): around the whole object box when it fits
        # (zoom), else around a random object pixel.
        ys, xs = np.nonzero(g == 1)
        if len(ys) == 0 and attempt < 3:
            continue
        if len(ys) and zoom and max(ys.max() - ys.min(), xs.max() - xs.min()) < frame:
            lo_y, hi_y = max(ys.max() + 1 - frame, 0), min(ys.min(), max(h - frame, 0))
            lo_x, hi_x = max(xs.max() + 1 - frame, 0), min(xs.min(), max(w - frame, 0))
            y0 = int(rng.integers(lo_y, max(hi_y, lo_y) + 1))
            x0 = int(rng.integers(lo_x, max(hi_x, lo_x) + 1))
        elif len(ys):
            k = int(rng.integers(len(ys)))
            y0 = int(np.clip(ys[k] - rng.integers(frame), 0, max(h - frame, 0)))
            x0 = int(np.clip(xs[k] - rng.integers(frame), 0, max(w - frame, 0)))
        else:
            y0 = x0 = 0
        img_c, g_c = img[y0 : y0 + frame, x0 : x0 + frame], g[y0 : y0 + frame, x0 : x0 + frame]
        if (g_c == 1).sum() >= d.min_object_pixels or attempt == 3:
            img, g = img_c, g_c
            break
    if d.flip and rng.random() < 0.5:
        img, g = img[:, ::-1], g[:, ::-1]
    if d.jitter:
        j = float(d.jitter)
        im = Image.fromarray(np.ascontiguousarray(img))
        for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            im = enh(im).enhance(float(rng.uniform(1 - j, 1 + j)))
        img = np.asarray(im)
    h, w = g.shape
    out_img = np.zeros((frame, frame, 3), np.uint8)
    out_img[:h, :w] = img
    out_gt = np.full((frame, frame), -1, np.int8)
    out_gt[:h, :w] = g
    obj = out_gt == 1
    if not obj.any():  # degenerate sample (tiny object lost in resizing): a 1-px object
        out_gt[h // 2, w // 2] = 1
        obj = out_gt == 1
    cy, cx = first_click(obj, rng, float(d.first_click_frac))
    return {
        "image": out_img,
        "gt": out_gt,
        "valid_hw": np.array([h, w], np.int32),
        "first_click": np.array([cy, cx], np.int32),
        "radius": np.float32(click_radius * scale),
    }


# ---------------------------------------------------------------------------------- datasets


class _Subset:
    """Random-access view ``source[indices[i]]`` (picklable, for worker processes)."""

    def __init__(self, source: Any, indices: np.ndarray) -> None:
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[int(self.indices[int(i)])]


class _Augment(grain.transforms.RandomMap):
    def __init__(self, frame: int, d: Any, click_radius: float) -> None:
        self.frame, self.d, self.click_radius = frame, d, click_radius

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return augment(element, rng, self.frame, self.d, self.click_radius)


class _PickView(grain.transforms.RandomMap):
    """Instance k -> one of its cached views, drawn with the element's seeded rng."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def random_map(self, k: int, rng: np.random.Generator) -> dict:
        v = int(rng.integers(self.cache.views))
        return self.cache[int(k) * self.cache.views + v]


def make_train_dataset(
    config: ml_collections.ConfigDict,
    source: Any,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The training ``IterDataset`` of this process (batches of its share of the global batch)."""
    d = config.data
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    local_devices = jax.local_device_count()
    batch = int(d.per_device_batch_size) * local_devices
    if d.get("use_cached_embeddings", False):
        # Cached views (embedding_cache.py): shuffled instances, one of their views at random.
        from samref_jax.training.embedding_cache import (
            check_frozen_encoder,
            open_cache,
            source_data_dir,
        )

        check_frozen_encoder(config)
        data_dir = as_path(d.data_dir) if d.data_dir else source_data_dir(source)
        cache = open_cache(config, data_dir)
        ds = grain.MapDataset.range(cache.num_instances)
        ds = ds.shuffle(seed=int(config.seed)).repeat()
        ds = ds.random_map(_PickView(cache), seed=int(config.seed) + 1)
    else:
        train_idx, _ = split_indices(len(source), int(d.heldout_every))
        frame = sam_config_from(config.model).img_size
        aug = _Augment(frame, ml_collections.FrozenConfigDict(d), float(config.model.click_radius))
        ds = grain.MapDataset.source(_Subset(source, train_idx))
        ds = ds.shuffle(seed=int(config.seed)).repeat().random_map(aug, seed=int(config.seed) + 1)
    ds = ds.batch(batch, drop_remainder=True)
    if pc > 1:  # this process's batches: its part of every global batch (module docstring)
        ds = ds[pi::pc]
    it_ds = ds.to_iter_dataset()
    if int(d.num_workers) > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers)))
    return it_ds


def heldout_samples(
    config: ml_collections.ConfigDict, source: Any, num: int | None = None
) -> list[dict]:
    """Held-out instances (never trained on), centre-cropped to a square and resized to the
    frame, so that periodic evaluation compiles the predictor once."""
    d = config.data
    _, held = split_indices(len(source), int(d.heldout_every))
    held = held[: (len(held) if num is None else int(num))]
    frame = sam_config_from(config.model).img_size
    out = []
    for i in held.tolist():
        s = source[i]
        img, gt = np.asarray(s["image"]), np.asarray(s["gt"]).astype(np.int8)
        h, w = gt.shape
        side = min(h, w)
        ys, xs = np.nonzero(gt == 1)
        cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (h // 2, w // 2)
        y0 = int(np.clip(cy - side // 2, 0, h - side))
        x0 = int(np.clip(cx - side // 2, 0, w - side))
        img = _resize(
            np.ascontiguousarray(img[y0 : y0 + side, x0 : x0 + side]), (frame, frame), False
        )
        g = _resize(
            np.ascontiguousarray(gt[y0 : y0 + side, x0 : x0 + side]).view(np.uint8),
            (frame, frame),
            True,
        ).view(np.int8)
        if (g == 1).sum() == 0:
            continue
        sid = s["id"].decode() if isinstance(s["id"], bytes) else str(s["id"])
        out.append({"image": img, "gt": g, "id": sid})
    return out
