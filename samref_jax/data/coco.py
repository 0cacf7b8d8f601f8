"""COCO-format instance annotations (COCO 2017, LVIS v1): reading, merging, compact masks, and
one training instance per example.

An annotation file is COCO's JSON: ``images`` (``id``, ``width``, ``height`` and ``file_name``,
or LVIS's ``coco_url``) and ``annotations`` (``image_id``, ``segmentation``, ``category_id``,
``iscrowd``, ``id``). A segmentation is a list of polygons, an uncompressed RLE (``counts`` a
list of run lengths; COCO's crowd regions) or a compressed RLE (``counts`` a string); every
kind is stored as pycocotools' compressed RLE string.

Several files (COCO + LVIS) are merged by image FILE NAME (the basename of ``file_name``, else of
``coco_url``; LVIS v1 lists COCO 2017 images by URL): an image's instances are those of every
file that lists it, in file order. A non-crowd instance of a later file whose mask has an IoU of
at least ``dedup_iou`` with a non-crowd instance of an earlier file is dropped (the same object
annotated twice; give LVIS first to keep its masks). This rule is this project's.

An image record (one per image; :mod:`samref_jax.data.coco_tfds` writes them)::

    image     bytes          the image file as stored (JPEG/PNG), decoded at training time
    id        bytes          the merge key (file name)
    image_id  int64 ()       the image's id in the first file that lists it
    hw        int32 (2,)     (height, width) of the annotation (= of the stored pixels)
    masks     list[bytes]    (K,) compressed RLE counts (pycocotools), size ``hw``
    area      float32 (K,)   mask pixel counts
    category  int32 (K,)     ``category_id`` (per source file: COCO and LVIS ids differ)
    crowd     bool (K,)      ``iscrowd = 1``: an ignore region, never a training object
    ann_id    int64 (K,)     annotation ``id``
    source    int8 (K,)      index of the annotation file the instance comes from

Only images with at least one non-empty, non-crowd instance get a record. Pixels are the stored
array: no EXIF rotation is applied (COCO's annotations are on the stored pixels), and the
image's size must equal the annotation's.

Training (:func:`sample_instance`): one instance per example, drawn uniformly among the
non-crowd instances of at least ``min_area`` pixels (in the original image, before any
resizing; RITM filters after its augmentation); with probability ``merge_prob`` the object is
the union of 2..``max_merged`` instances, each touching (8-connected) the union so far (RITM's
merged-object sampling); crowd pixels outside the object become ignore (``-1``), which the
training step leaves out of its losses, IoU and clicks. The result is the folder datasets'
sample ``{"image": uint8[H, W, 3], "gt": int8[H, W], "id": str}``, so the existing augmentation
turns it into the same training example.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from samref_jax.data.decode import IGNORE, DataError
from samref_jax.paths import as_path

__all__ = [
    "CocoAnnotation",
    "CocoImage",
    "decode_image_bytes",
    "decode_masks",
    "encode_instances",
    "encode_segmentation",
    "index_images",
    "largest_instance",
    "load_annotation_file",
    "resolve_image_files",
    "sample_instance",
]


@dataclass(frozen=True, slots=True)
class CocoAnnotation:
    """One annotation as read, with only what the records use (LVIS v1 train has 1.27M: the
    memory of reading them, docs/benchmarks.md, ``coco_index_memory.py``).

    ``segmentation`` is a tuple of ``float64`` polygon arrays (a malformed polygon is kept as
    read, for :func:`encode_segmentation` to name), an RLE dict (uncompressed ``counts`` as an
    ``int64`` array), or whatever else the file holds (None when absent).
    """

    id: Any
    image_id: Any
    category_id: Any
    iscrowd: bool
    segmentation: Any


@dataclass
class CocoImage:
    """One image of the merged annotation files, before its masks are converted.

    ``anns`` holds ``(source file index, CocoAnnotation)`` pairs in file order; ``names`` the
    relative paths to look for in the image folders (``file_name``, the URL's last two parts,
    the basename); ``path`` is set by :func:`resolve_image_files`.
    """

    key: str
    image_id: int
    height: int
    width: int
    names: tuple[str, ...]
    anns: list[tuple[int, dict]] = field(default_factory=list)
    path: Any = None


# ------------------------------------------------------------------------------ annotations


_IMAGE_FIELDS = ("id", "file_name", "coco_url", "height", "width")


def _polygon(p: Any) -> Any:
    if isinstance(p, list):
        try:
            return np.asarray(p, np.float64)
        except (TypeError, ValueError):
            pass
    return p


def _compact(d: dict) -> Any:
    """``json`` object hook: annotations -> :class:`CocoAnnotation`, uncompressed RLE counts ->
    arrays, image entries -> their five used fields; other objects unchanged."""
    if "segmentation" in d and "image_id" in d:
        seg = d["segmentation"]
        if isinstance(seg, list):
            seg = tuple(_polygon(p) for p in seg)
        return CocoAnnotation(
            d.get("id"), d["image_id"], d.get("category_id", 0), bool(d.get("iscrowd", 0)), seg
        )
    if "counts" in d and "size" in d and isinstance(d["counts"], list):
        try:
            return {**d, "counts": np.asarray(d["counts"], np.int64)}
        except (TypeError, ValueError, OverflowError):
            return d
    if "height" in d and "width" in d and ("file_name" in d or "coco_url" in d):
        return {k: d[k] for k in _IMAGE_FIELDS if k in d}
    return d


def load_annotation_file(path: str | os.PathLike) -> dict:
    """Parse one COCO-format JSON (local or ``gs://``); :class:`DataError` names the file.

    Returns ``{"images": [dict], "annotations": [CocoAnnotation], ...}``: annotations are
    made compact while the file is parsed (an image entry keeps ``id``, ``file_name``,
    ``coco_url``, ``height``, ``width``), so the peak memory is about the file's text plus the
    compact annotations (docs/benchmarks.md, ``coco_index_memory.py``).
    """
    path = as_path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with path.open("rb") as fh:
            text = fh.read().decode("utf-8-sig")  # the bytes are freed before parsing
        data = json.loads(text, object_hook=_compact)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as JSON: {e}") from None
    del text
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path} is not a COCO-format instance file (no images/annotations)")
    anns = data["annotations"]
    if not isinstance(anns, list) or not isinstance(data["images"], list):
        raise DataError(f"{path}: images and annotations must be JSON lists")
    for i, a in enumerate(anns):
        if not isinstance(a, CocoAnnotation):
            if not isinstance(a, dict):
                raise DataError(f"{path}: annotation {i} is not a JSON object")
            anns[i] = CocoAnnotation(  # no segmentation or no image_id: named later
                a.get("id"), a.get("image_id"), a.get("category_id", 0), False, None
            )
    return data


def _image_names(img: dict) -> tuple[str, ...]:
    names: list[str] = []
    if img.get("file_name"):
        names.append(str(img["file_name"]).lstrip("/"))
    if img.get("coco_url"):
        parts = str(img["coco_url"]).rstrip("/").split("/")
        names.append("/".join(parts[-2:]))
    names += [n.rsplit("/", 1)[-1] for n in names]
    return tuple(dict.fromkeys(n for n in names if n))


def index_images(files: Sequence[dict], labels: Sequence[str] | None = None) -> list[CocoImage]:
    """Merge parsed annotation files into images sorted by key (module docstring).

    Args:
      files: parsed JSONs (:func:`load_annotation_file`), in merge order.
      labels: a name per file for error messages (default ``file 0``, ...).

    Returns:
      The images that have at least one non-crowd annotation, sorted by file name.
    """
    labels = list(labels or [f"file {i}" for i in range(len(files))])
    by_key: dict[str, CocoImage] = {}
    for s, data in enumerate(files):
        local: dict[int, CocoImage] = {}
        for img in data["images"]:
            names = _image_names(img)
            if not names:
                raise DataError(f"{labels[s]}: image {img.get('id')} has no file_name or coco_url")
            key = names[0].rsplit("/", 1)[-1]
            try:
                h, w, iid = int(img["height"]), int(img["width"]), int(img["id"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{labels[s]}: image {key} lacks id/height/width") from None
            entry = by_key.get(key)
            if entry is None:
                entry = by_key[key] = CocoImage(key, iid, h, w, names)
            elif (entry.height, entry.width) != (h, w):
                raise DataError(
                    f"{labels[s]}: image {key} is {w}x{h}, an earlier file says "
                    f"{entry.width}x{entry.height}"
                )
            else:
                entry.names = tuple(dict.fromkeys(entry.names + names))
            local[iid] = entry
        for ann in data["annotations"]:
            entry = local.get(ann.image_id)
            if entry is None:
                raise DataError(
                    f"{labels[s]}: annotation {ann.id} refers to image "
                    f"{ann.image_id}, which the file does not list"
                )
            entry.anns.append((s, ann))
    keep = [e for e in by_key.values() if any(not a.iscrowd for _, a in e.anns)]
    return sorted(keep, key=lambda e: e.key)


def resolve_image_files(
    images: list[CocoImage], folders: Sequence[str | os.PathLike]
) -> list[CocoImage]:
    """Set ``path`` of every image from the first folder holding one of its names.

    Each folder is listed once (a ``gs://`` folder too) and plain file names are found in the
    listings; only then are names with a sub-folder (``train2017/x.jpg``, from LVIS's URL) tried
    file by file, for a folder that holds ``train2017/``. Returns the images NOT found.
    """
    roots = [as_path(f) for f in folders]
    for r in roots:
        if not r.is_dir():
            raise DataError(f"image folder not found: {r}")
    listings: list[set[str] | None] = [None] * len(roots)
    missing = []
    for e in images:
        e.path = None
        for i, r in enumerate(roots):  # plain names: one listing per folder, no file probes
            if listings[i] is None:
                listings[i] = {p.name for p in r.iterdir()}
            name = next((n for n in e.names if "/" not in n and n in listings[i]), None)
            if name is not None:
                e.path = r / name
                break
        for r in roots if e.path is None else ():  # then sub-folder names (train2017/x.jpg)
            name = next((n for n in e.names if "/" in n and (r / n).is_file()), None)
            if name is not None:
                e.path = r / name
                break
        if e.path is None:
            missing.append(e)
    return missing


# ------------------------------------------------------------------------------ masks


def encode_segmentation(seg: Any, h: int, w: int, where: str = "") -> bytes:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> compressed RLE
    counts for an ``h x w`` image. Degenerate polygons (fewer than 3 points) are dropped, so the
    result may be an empty mask. :class:`DataError` (naming ``where``) for a malformed one."""
    try:
        if isinstance(seg, list | tuple):
            polys = [
                np.asarray(p, np.float64)
                for p in seg
                if isinstance(p, list | np.ndarray) and len(p) >= 6 and len(p) % 2 == 0
            ]
            if any(p.ndim != 1 for p in polys):
                raise DataError(f"{where}: malformed segmentation (a polygon is not flat)")
            if not polys:  # pycocotools reads a lone 4-number "polygon" as a box: never pass one
                return mask_utils.encode(np.zeros((h, w), np.uint8, order="F"))["counts"]
            return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))["counts"]
        if isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if [int(v) for v in seg["size"]] != [h, w]:
                raise DataError(f"{where}: RLE size {seg['size']} is not the image's {[h, w]}")
            counts = seg["counts"]
            if isinstance(counts, list | np.ndarray):  # uncompressed RLE (crowd regions)
                if sum(int(c) for c in counts) != h * w:
                    raise DataError(f"{where}: uncompressed RLE does not cover {h}x{w} pixels")
                return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
            counts = counts.encode() if isinstance(counts, str) else bytes(counts)
            mask_utils.area({"size": [h, w], "counts": counts})  # validates the string
            return counts
    except DataError:
        raise
    except Exception as e:  # pycocotools raises plain Exceptions / TypeErrors on bad input
        raise DataError(f"{where}: malformed segmentation ({e})") from None
    raise DataError(f"{where}: segmentation is neither polygons nor RLE")


def _rle(counts: bytes, hw: Sequence[int]) -> dict:
    return {"size": [int(hw[0]), int(hw[1])], "counts": counts}


def encode_instances(image: CocoImage, dedup_iou: float | None = 0.8) -> dict[str, Any]:
    """The instance fields of an image record (module docstring); empty masks dropped,
    later-file duplicates dropped when ``dedup_iou`` (module docstring)."""
    h, w = image.height, image.width
    masks, area, cat, crowd, ann_id, source = [], [], [], [], [], []
    for s, ann in image.anns:
        where = f"image {image.key}, annotation {ann.id}"
        counts = encode_segmentation(ann.segmentation, h, w, where)
        a = float(mask_utils.area(_rle(counts, (h, w))))
        if a <= 0:
            continue
        is_crowd = ann.iscrowd
        if dedup_iou and not is_crowd:
            earlier = [
                _rle(m, (h, w))
                for m, c, src in zip(masks, crowd, source, strict=True)
                if not c and src < s
            ]
            if earlier:
                iou = mask_utils.iou([_rle(counts, (h, w))], earlier, [0] * len(earlier))
                if float(np.max(iou)) >= float(dedup_iou):
                    continue
        masks.append(counts)
        area.append(a)
        cat.append(int(ann.category_id))
        crowd.append(is_crowd)
        ann_id.append(-1 if ann.id is None else int(ann.id))
        source.append(s)
    return {
        "masks": masks,
        "area": np.asarray(area, np.float32),
        "category": np.asarray(cat, np.int32),
        "crowd": np.asarray(crowd, np.bool_),
        "ann_id": np.asarray(ann_id, np.int64),
        "source": np.asarray(source, np.int8),
    }


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an encoded image (header only)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


# ------------------------------------------------------------------------------ records


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def decode_image_bytes(data: bytes, hw: Sequence[int] | None = None) -> np.ndarray:
    """Encoded image -> ``uint8[H, W, 3]`` RGB, the stored pixels (no EXIF rotation)."""
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if hw is not None and arr.shape[:2] != (int(hw[0]), int(hw[1])):
        raise DataError(f"image is {arr.shape[1]}x{arr.shape[0]}, its masks {hw[1]}x{hw[0]}")
    return arr


def decode_masks(record: dict, which: Iterable[int]) -> np.ndarray:
    """``bool[k, H, W]``: the masks ``which`` of an image record."""
    which = list(which)
    h, w = (int(v) for v in record["hw"])
    if not which:
        return np.zeros((0, h, w), np.bool_)
    rles = [_rle(bytes(record["masks"][i]), (h, w)) for i in which]
    with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(np.bool_)


def eligible_instances(record: dict, min_area: float) -> np.ndarray:
    """Indices of the non-crowd instances of at least ``min_area`` (>= 1) pixels."""
    area = np.asarray(record["area"], np.float32)
    crowd = np.asarray(record["crowd"], np.bool_)
    return np.nonzero(~crowd & (area >= max(float(min_area), 1.0)))[0]


def _sample(record: dict, chosen: list[int], obj: np.ndarray | None = None) -> dict:
    if obj is None:
        obj = decode_masks(record, chosen).any(axis=0)
    gt = obj.astype(np.int8)
    crowd = np.nonzero(np.asarray(record["crowd"], np.bool_))[0]
    if len(crowd):
        gt[decode_masks(record, crowd).any(axis=0) & ~obj] = IGNORE
    ids = np.asarray(record["ann_id"])
    name = _text(record["id"]) + "#" + "+".join(str(int(ids[i])) for i in chosen)
    return {"image": decode_image_bytes(record["image"], record["hw"]), "gt": gt, "id": name}


def _boxes(record: dict, which: np.ndarray) -> np.ndarray:
    """``(k, 4)`` int boxes ``(y0, x0, y1, x1)`` (exclusive ends) of the masks ``which``."""
    h, w = (int(v) for v in record["hw"])
    rles = [_rle(bytes(record["masks"][i]), (h, w)) for i in which]
    xywh = mask_utils.toBbox(rles).reshape(-1, 4)
    x0, y0 = np.floor(xywh[:, 0]), np.floor(xywh[:, 1])
    return np.stack([y0, x0, y0 + xywh[:, 3], x0 + xywh[:, 2]], 1).astype(np.int64)


def sample_instance(
    record: dict,
    rng: np.random.Generator,
    *,
    min_area: float = 0.0,
    merge_prob: float = 0.0,
    max_merged: int = 1,
) -> dict | None:
    """One training sample ``{"image", "gt", "id"}`` from an image record (module docstring),
    or None when no instance has ``min_area`` pixels.

    ``gt`` is ``int8[H, W]``: 1 the object (one instance, or with probability ``merge_prob`` the
    union of 2..``max_merged`` touching ones), -1 crowd pixels outside it, 0 elsewhere. Draws
    from ``rng`` only: the same generator state gives the same sample.
    """
    from scipy import ndimage

    cand = eligible_instances(record, min_area)
    if len(cand) == 0:
        return None
    first = int(cand[int(rng.integers(len(cand)))])
    chosen, obj = [first], None
    if int(max_merged) > 1 and len(cand) > 1 and rng.random() < float(merge_prob):
        want = int(rng.integers(2, int(max_merged) + 1))
        obj = decode_masks(record, [first])[0]
        boxes = dict(zip(cand.tolist(), _boxes(record, cand), strict=True))
        while len(chosen) < want:
            grown = ndimage.binary_dilation(obj, np.ones((3, 3), bool))
            ys, xs = np.nonzero(grown.any(1))[0], np.nonzero(grown.any(0))[0]
            gy0, gy1, gx0, gx1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
            near = [
                j
                for j in cand.tolist()
                if j not in chosen
                and boxes[j][0] < gy1
                and boxes[j][2] > gy0
                and boxes[j][1] < gx1
                and boxes[j][3] > gx0
            ]
            masks = decode_masks(record, near)
            touching = [j for j, m in zip(near, masks, strict=True) if (m & grown).any()]
            if not touching:
                break
            k = int(rng.integers(len(touching)))
            chosen.append(touching[k])
            obj = obj | masks[near.index(touching[k])]
    return _sample(record, chosen, obj)


def largest_instance(record: dict, min_area: float = 0.0) -> dict | None:
    """The sample of the record's largest non-crowd instance of at least ``min_area`` pixels
    (deterministic: held-out evaluation), or None."""
    cand = eligible_instances(record, min_area)
    if len(cand) == 0:
        return None
    area = np.asarray(record["area"], np.float32)
    return _sample(record, [int(cand[int(np.argmax(area[cand]))])])


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def check_name(name: str) -> str:
    """A prepared dataset's name: lower-case letters, digits and ``_``."""
    if not _NAME_RE.match(str(name)):
        raise DataError(
            f"dataset name {name!r}: use lower-case letters, digits and '_' (e.g. coco_lvis)"
        )
    return str(name)
