"""Training input pipeline: Grain over the TFDS ArrayRecord source.

See docs/design.md, 'TFDS without TensorFlow'.

``MapDataset.source(ArrayRecordDataSource)`` (training indices) -> shuffle (per epoch, seeded)
-> repeat -> ``random_map(augment)`` (random scale, crop, flip, optionally copy-paste onto another
record, colour jitter, resize-and-pad to the frame, first click inside the object; docs/training.md,
'Augmentations') -> batch (this process's share of the global batch) -> this process's batches
-> ``to_iter_dataset`` (optionally ``mp_prefetch`` worker processes).

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

``data.format = "coco"`` (``samref prepare-coco``): the records are images; the random map first
draws one instance of the image (:func:`coco_sample`: area filter, merged touching instances,
crowd pixels as ignore), then augments it as above, so the example is the same.

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
from samref_jax.samref.model import detail_scale


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
    if is_coco(config):  # one record per image (samref_jax.data.coco_tfds)
        return _coco_source(config, data_dir)
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


def _box(obj: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y_min, y_max, x_min, x_max), inclusive, of a (H, W) bool mask's pixels; None if empty."""
    rows, cols = np.flatnonzero(obj.any(1)), np.flatnonzero(obj.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def first_click(obj: np.ndarray, rng: np.random.Generator, frac: float) -> tuple[int, int]:
    """(y, x) of a random object pixel whose distance to the background (or the frame's edge)
    is >= frac * max; an empty ``obj``: a random pixel.

    The distance transform runs on the object's box with a one-pixel border only: inside the
    box it equals the whole frame's (a background pixel outside the box is never nearer than
    the border), so the clicks are the same, at a cost set by the object, not the frame.
    """
    b = _box(obj)
    if b is None:
        k = int(rng.integers(obj.size))
        return k // obj.shape[1], k % obj.shape[1]
    y0, x0 = b[0], b[2]
    box = obj[y0 : b[1] + 1, x0 : b[3] + 1]
    dt = ndimage.distance_transform_edt(np.pad(box, 1))[1:-1, 1:-1]
    m = dt.max()
    idx = np.flatnonzero(dt >= max(frac * m, min(m, 1.0)))  # row-major, as np.nonzero
    y, x = divmod(int(idx[rng.integers(idx.size)]), box.shape[1])
    return y + y0, x + x0


def augment(
    sample: dict,
    rng: np.random.Generator,
    frame: int,
    d: Any,
    click_radius: float,
    paste_pool: Any = None,
    click: bool = True,
) -> dict:
    """One training example from a ``{"image", "gt"}`` sample (module docstring).

    ``click=False``: no ``first_click`` (its distance transform is the costliest step left
    when a later step draws the click anyway, as :func:`detail_example` does).

    ``paste_pool`` (random access to the split's records): with ``d.copy_paste_prob`` the
    object, after its own scale, crop and flip, is pasted onto another record of it
    (:func:`copy_paste`). Without a pool, or with the probability 0, nothing is drawn for it.
    """
    image = np.asarray(sample["image"])
    gt = np.asarray(sample["gt"]).astype(np.int8)
    h0, w0 = gt.shape
    base = frame / max(h0, w0)
    zoom = tuple(d.get("zoom_in", ()) or ())
    box0 = _box(gt == 1)
    for attempt in range(4):
        scale = base * (float(rng.uniform(d.scale_min, d.scale_max)) if attempt < 3 else 1.0)
        if zoom and box0 is not None and attempt < 3:
            # Object-centric zoom: the object's longer box side becomes zoom[0..1] x frame
            # (not below scale_min x the whole-image fit, not above the native resolution).
            side = max(box0[1] - box0[0] + 1, box0[3] - box0[2] + 1)
            target = float(rng.uniform(zoom[0], zoom[1])) * frame / side
            scale = float(np.clip(target, base * d.scale_min, max(1.0, base * d.scale_min)))
        h, w = max(1, int(round(h0 * scale))), max(1, int(round(w0 * scale)))
        img = _resize(image, (h, w), nearest=False)
        g = _resize(gt.view(np.uint8), (h, w), nearest=True).view(np.int8)
        # Crop a frame-sized window (when larger): around the whole object box when it fits
        # (zoom), else around a random object pixel (idx: the object's pixels in row-major
        # order, as np.nonzero lists them).
        obj = g == 1
        idx = np.flatnonzero(obj)
        if idx.size == 0 and attempt < 3:
            continue
        box = _box(obj) if zoom and idx.size else None
        if box is not None and max(box[1] - box[0], box[3] - box[2]) < frame:
            lo_y, hi_y = max(box[1] + 1 - frame, 0), min(box[0], max(h - frame, 0))
            lo_x, hi_x = max(box[3] + 1 - frame, 0), min(box[2], max(w - frame, 0))
            y0 = int(rng.integers(lo_y, max(hi_y, lo_y) + 1))
            x0 = int(rng.integers(lo_x, max(hi_x, lo_x) + 1))
        elif idx.size:
            yk, xk = divmod(int(idx[rng.integers(idx.size)]), w)
            y0 = int(np.clip(yk - rng.integers(frame), 0, max(h - frame, 0)))
            x0 = int(np.clip(xk - rng.integers(frame), 0, max(w - frame, 0)))
        else:
            y0 = x0 = 0
        img_c, g_c = img[y0 : y0 + frame, x0 : x0 + frame], g[y0 : y0 + frame, x0 : x0 + frame]
        if (g_c == 1).sum() >= d.min_object_pixels or attempt == 3:
            img, g = img_c, g_c
            break
    if d.flip and rng.random() < 0.5:
        img, g = img[:, ::-1], g[:, ::-1]
    cp = float(d.get("copy_paste_prob", 0.0) or 0.0)
    if paste_pool is not None and len(paste_pool) and cp > 0 and rng.random() < cp:
        img, g, scale = copy_paste(img, g, scale, rng, frame, d, paste_pool, sample.get("id"))
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
    ex = {"image": out_img, "gt": out_gt, "valid_hw": np.array([h, w], np.int32)}
    if click:
        ex["first_click"] = np.array(first_click(obj, rng, float(d.first_click_frac)), np.int32)
    return ex | {"radius": np.float32(click_radius * scale)}


# ------------------------------------------------------------------------------- copy-paste


def _same_id(a: Any, b: Any) -> bool:
    return a is not None and b is not None and np.array_equal(np.asarray(a), np.asarray(b))


def _paste_record(pool: Any, rng: np.random.Generator, d: Any, avoid_id: Any, obj: bool) -> dict:
    """A random record of ``pool``: the first of the 8 records from a random index on whose
    ``id`` is not ``avoid_id`` (else the last of them); ``obj``: as an ``{"image", "gt"}``
    sample (a COCO image record gives one of its instances)."""
    n = len(pool)
    k = int(rng.integers(n))
    for j in range(min(n, 8)):
        rec = pool[(k + j) % n]
        if not _same_id(rec.get("id"), avoid_id):
            break
    if obj and "gt" not in rec:  # a COCO image record: one of its instances
        rec = coco_sample(rec, rng, d, pool)
    elif "gt" not in rec:  # a COCO image record as a background: its decoded pixels
        from samref_jax.data.coco import decode_image_bytes

        rec = {"image": decode_image_bytes(rec["image"], rec["hw"]), "id": rec["id"]}
    return rec


def _object_patch(image: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The object's bounding box: ``(pixels uint8 (h, w, 3), mask bool (h, w))``; None if empty."""
    ys, xs = np.nonzero(gt == 1)
    if not len(ys):
        return None
    box = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return np.ascontiguousarray(image[box]), np.ascontiguousarray(gt[box] == 1)


def _scaled_patch(
    patch: tuple[np.ndarray, np.ndarray], s: float, limit_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, float]:
    """``patch`` scaled by ``s`` (less where it would not fit ``limit_hw``): pixels and mask
    resized together, bilinear on premultiplied RGBA (Pillow), so that no colour from outside
    the mask bleeds into the object; mask = alpha >= 1/2. Returns (pixels, mask, scale used)."""
    img, m = patch
    ph, pw = m.shape
    s = min(float(s), limit_hw[0] / ph, limit_hw[1] / pw)
    hw = (max(1, min(limit_hw[0], round(ph * s))), max(1, min(limit_hw[1], round(pw * s))))
    if hw == (ph, pw):
        return img, m, s
    rgba = np.concatenate([img, m[..., None].astype(np.uint8) * 255], -1)
    out = np.asarray(Image.fromarray(rgba, "RGBA").resize((hw[1], hw[0]), Image.BILINEAR))
    return out[..., :3], out[..., 3] >= 128, s


def _paste_background(rec: dict, rng: np.random.Generator, frame: int, d: Any) -> np.ndarray:
    """A record's image fitted to the frame, zoomed by U(1, scale_max), randomly cropped to at
    most frame x frame and flipped (``d.flip``): uint8 (h, w, 3), h, w <= frame."""
    image = np.asarray(rec["image"])
    h0, w0 = image.shape[:2]
    s = frame / max(h0, w0) * float(rng.uniform(1.0, max(1.0, float(d.scale_max))))
    h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
    img = _resize(image, (h, w), nearest=False)
    y0, x0 = int(rng.integers(max(h - frame, 0) + 1)), int(rng.integers(max(w - frame, 0) + 1))
    img = img[y0 : y0 + frame, x0 : x0 + frame]
    if d.flip and rng.random() < 0.5:
        img = img[:, ::-1]
    return np.array(img)  # a writable copy


def _paste_distractor(
    out: np.ndarray,
    gt: np.ndarray,
    rng: np.random.Generator,
    frame: int,
    d: Any,
    pool: Any,
    avoid_id: Any,
) -> None:
    """Pastes another record's object (its own fit-to-frame scale x U(scale_min, scale_max),
    flipped) onto ``out`` in place, at the first of 4 random positions where it covers at most
    ``d.copy_paste_max_cover`` of the target (``gt == 1``); the covered target pixels become
    background in ``gt``. No position found: nothing is pasted."""
    rec = _paste_record(pool, rng, d, avoid_id, obj=True)
    og = np.asarray(rec["gt"])
    patch = _object_patch(np.asarray(rec["image"]), og)
    if patch is None:
        return
    h, w = gt.shape
    s = frame / max(og.shape) * float(rng.uniform(d.scale_min, d.scale_max))
    dimg, dm, _ = _scaled_patch(patch, s, (h, w))
    if d.flip and rng.random() < 0.5:
        dimg, dm = dimg[:, ::-1], dm[:, ::-1]
    target = gt == 1
    limit = float(d.get("copy_paste_max_cover", 0.3)) * target.sum()
    dh, dw = dm.shape
    for _ in range(4):
        y, x = int(rng.integers(h - dh + 1)), int(rng.integers(w - dw + 1))
        if (target[y : y + dh, x : x + dw] & dm).sum() <= limit:
            out[y : y + dh, x : x + dw][dm] = dimg[dm]
            gt[y : y + dh, x : x + dw][dm] = 0
            return


def copy_paste(
    img: np.ndarray,
    g: np.ndarray,
    scale: float,
    rng: np.random.Generator,
    frame: int,
    d: Any,
    pool: Any,
    sample_id: Any = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Copy-paste: the target object onto another record's image (a new background).

    The object (``g == 1``) of the scaled, cropped and flipped example ``(img, g)`` is cut
    out, scaled by U(``d.copy_paste_scale``) (less if it would not fit) and pasted at a random
    position onto a random other record of ``pool`` (``_paste_background``); that record's own
    objects are background. With ``d.copy_paste_distractor_prob`` an object of a third record
    is then pasted over the scene, covering at most ``d.copy_paste_max_cover`` of the target
    (covered target pixels become background). Every draw comes from ``rng``.

    Args:
      img: uint8 (h, w, 3) the example's pixels; g: int8 (h, w) 1 object, 0 background,
        -1 ignore.
      scale: the example's scale from its original pixels (the click radius follows it).
      frame: the frame side F; the new canvas is at most F x F.
      d: the ``data`` config; pool: random access to the split's records (``_Subset``).
      sample_id: the example's record ``id``, so that its own record is not the background.

    Returns:
      ``(image uint8 (H, W, 3), gt int8 (H, W) 1 object / 0 background, scale)``; the input
      unchanged when the object is empty or would vanish in the resize.
    """
    patch = _object_patch(img, g)
    if patch is None:
        return img, g, scale
    canvas = _paste_background(_paste_record(pool, rng, d, sample_id, obj=False), rng, frame, d)
    h, w = canvas.shape[:2]
    lo, hi = (float(v) for v in d.get("copy_paste_scale", (0.75, 1.25)))
    pimg, pm, s = _scaled_patch(patch, float(rng.uniform(lo, hi)), (h, w))
    if pm.sum() < min(int(d.min_object_pixels), int(patch[1].sum())):
        return img, g, scale
    ph, pw = pm.shape
    y, x = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
    gt = np.zeros((h, w), np.int8)
    canvas[y : y + ph, x : x + pw][pm] = pimg[pm]
    gt[y : y + ph, x : x + pw][pm] = 1
    dp = float(d.get("copy_paste_distractor_prob", 0.0) or 0.0)
    if dp > 0 and rng.random() < dp:
        _paste_distractor(canvas, gt, rng, frame, d, pool, sample_id)
    return canvas, gt, scale * s


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
    """:func:`augment` with the element's seeded rng; ``paste_pool`` (picklable random access
    to the split, e.g. a ``_Subset``, for worker processes): the copy-paste backgrounds."""

    def __init__(
        self, frame: int, d: Any, click_radius: float, paste_pool: Any = None, click: bool = True
    ) -> None:
        self.frame, self.d, self.click_radius = frame, d, click_radius
        self.paste_pool, self.click = paste_pool, click

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return augment(
            element, rng, self.frame, self.d, self.click_radius, self.paste_pool, self.click
        )


def detail_example(
    ex: dict, rng: np.random.Generator, frame: int, k: int, first_click_frac: float
) -> dict:
    """An example augmented at ``k x frame`` -> the same example at ``frame``, its image at
    ``k x frame`` kept as ``detail_image`` (PatchDiff's image source, ``image_scale = k``).

    The valid area is trimmed to a multiple of k, so frame pixel (i, j) covers exactly the
    detail pixels [k i, k i + k) x [k j, k j + k); the frame image is the detail image resized
    (Pillow bilinear, as the predictor resizes), the ground truth is taken nearest, and the
    first click is drawn again on the frame's object (``first_click_frac``).
    """
    hk, wk = (int(v) // k * k for v in ex["valid_hw"])
    hk, wk = max(hk, k), max(wk, k)
    h, w = hk // k, wk // k
    detail = np.zeros((k * frame, k * frame, 3), np.uint8)
    detail[:hk, :wk] = ex["image"][:hk, :wk]
    image = np.zeros((frame, frame, 3), np.uint8)
    image[:h, :w] = _resize(np.ascontiguousarray(detail[:hk, :wk]), (h, w), nearest=False)
    gt = np.full((frame, frame), -1, np.int8)
    gt[:h, :w] = np.asarray(ex["gt"])[k // 2 : hk : k, k // 2 : wk : k]
    obj = gt == 1
    if not obj.any():  # the object fell between the samples: keep one pixel of it
        ys, xs = np.nonzero(np.asarray(ex["gt"])[:hk, :wk] == 1)
        j = len(ys) // 2
        cy, cx = (ys[j] // k, xs[j] // k) if len(ys) else (h // 2, w // 2)
        gt[min(cy, h - 1), min(cx, w - 1)] = 1
        obj = gt == 1
    cy, cx = first_click(obj, rng, first_click_frac)
    return {
        "image": image,
        "gt": gt,
        "valid_hw": np.array([h, w], np.int32),
        "first_click": np.array([cy, cx], np.int32),
        "radius": np.float32(float(ex["radius"]) / k),
        "detail_image": detail,
    }


class _Detail(grain.transforms.RandomMap):
    """:func:`detail_example` with the element's seeded rng."""

    def __init__(self, frame: int, k: int, first_click_frac: float) -> None:
        self.frame, self.k, self.frac = frame, k, first_click_frac

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return detail_example(element, rng, self.frame, self.k, self.frac)


class _PickView(grain.transforms.RandomMap):
    """Instance k -> one of its cached views, drawn with the element's seeded rng."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def random_map(self, k: int, rng: np.random.Generator) -> dict:
        v = int(rng.integers(self.cache.views))
        return self.cache[int(k) * self.cache.views + v]


def read_with_workers(ds: grain.MapDataset, d: Any, prefetch: int) -> grain.IterDataset:
    """``ds`` read by Grain as training reads it: ``d.read_threads`` threads, at most
    ``prefetch`` elements ahead, in ``d.num_workers`` worker processes (0: this process)."""
    read = grain.ReadOptions(
        num_threads=int(d.get("read_threads", 16)), prefetch_buffer_size=int(prefetch)
    )
    it_ds = ds.to_iter_dataset(read)
    if int(d.num_workers) > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # the entry points parse their own FlagValues, and
            flags.FLAGS.mark_as_parsed()  # Grain's worker pool reads absl's global ones
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers)))
    return it_ds


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
    k = detail_scale(config.model)  # > 1: examples carry PatchDiff's detail image
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
        aug = _Augment(
            frame * k,  # k > 1: at PatchDiff's image scale, then brought to the frame
            ml_collections.FrozenConfigDict(d),
            float(config.model.click_radius),
            paste_pool=_Subset(source, train_idx),  # copy-paste: records of the same split
            click=k == 1,  # k > 1: detail_example draws the first click (its own rng)
        )
        if is_coco(config):  # an image record -> one of its instances, then augment
            aug = _CocoAugment(_Subset(source, train_idx), aug)
        ds = grain.MapDataset.source(_Subset(source, train_idx))
        ds = ds.shuffle(seed=int(config.seed)).repeat().random_map(aug, seed=int(config.seed) + 1)
        if k > 1:
            detail = _Detail(frame, k, float(d.first_click_frac))
            ds = ds.random_map(detail, seed=int(config.seed) + 2)
    ds = ds.batch(batch, drop_remainder=True)
    if pc > 1:  # this process's batches: its part of every global batch (module docstring)
        ds = ds[pi::pc]
    return read_with_workers(ds, d, int(d.get("prefetch_batches", 16)))


# --------------------------------------------------------------- COCO-format (one record per image)


def is_coco(config: ml_collections.ConfigDict) -> bool:
    """Whether ``data.format`` is ``"coco"`` (records are images; ``samref_jax.data.coco``)."""
    return str(config.data.get("format", "folder") or "folder") == "coco"


def _coco_source(config: ml_collections.ConfigDict, data_dir: str | Path) -> Any:
    from samref_jax.data.coco_tfds import source_for_config

    data_dir = as_path(data_dir)  # epath: gs://... kept verbatim
    data_dir.mkdir(parents=True, exist_ok=True)
    return source_for_config(config, data_dir)


def coco_sample(record: dict, rng: np.random.Generator, d: Any, pool: Any = None) -> dict:
    """One training sample ``{"image", "gt", "id"}`` from a COCO image record: an instance of
    at least ``d.coco.min_area`` pixels, or with ``d.coco.merge_prob`` a union of touching ones
    (``samref_jax.data.coco.sample_instance``). An image without such an instance is replaced
    by another record of ``pool`` drawn with ``rng`` (up to 8 draws), then by its largest
    non-crowd instance; everything is drawn from ``rng``."""
    from samref_jax.data import coco

    c = d.coco
    kw = dict(
        min_area=float(c.min_area), merge_prob=float(c.merge_prob), max_merged=int(c.max_merged)
    )
    s = coco.sample_instance(record, rng, **kw)
    for _ in range(8 if pool is not None and len(pool) else 0):
        if s is not None:
            return s
        s = coco.sample_instance(pool[int(rng.integers(len(pool)))], rng, **kw)
    if s is None:
        s = coco.largest_instance(record, 0.0)
    if s is None:
        raise ValueError(f"COCO record {record.get('id')!r} has no non-crowd instance")
    return s


def heldout_sample(element: dict, d: Any) -> dict | None:
    """A held-out element as a ``{"image", "gt", "id"}`` sample: folder samples as they are,
    COCO image records as their largest instance of at least ``d.coco.min_area`` pixels."""
    if "gt" in element:
        return element
    from samref_jax.data import coco

    return coco.largest_instance(element, float(d.coco.min_area))


def training_example(
    element: dict, rng: np.random.Generator, frame: int, d: Any, click_radius: float, pool: Any
) -> dict:
    """The training example of a source element: :func:`augment` of a folder sample, or of
    :func:`coco_sample` of a COCO image record (the same ``rng`` continues)."""
    if "gt" not in element:
        element = coco_sample(element, rng, d, pool)
    return augment(element, rng, frame, d, click_radius, pool)  # pool: copy-paste backgrounds


class _CocoAugment(grain.transforms.RandomMap):
    """Image record -> one sampled instance (:func:`coco_sample`) -> the folder augmentation."""

    def __init__(self, pool: Any, aug: _Augment) -> None:
        self.pool, self.aug = pool, aug

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        sample = coco_sample(element, rng, self.aug.d, self.pool)
        return self.aug.random_map(sample, rng)


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
        s = heldout_sample(source[i], d)
        if s is None:
            continue
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
