"""Upstream folder layouts of the interactive-segmentation sets, and a direct reader.

Every dataset is read from the layout its authors (and RITM) ship, so users can point at their
downloads (docs/design.md, 'Datasets'):

| set | layout |
|---|---|
| GrabCut | ``data_GT/*`` images, ``boundary_GT/*`` masks, same stem |
| Berkeley | ``images/*``, ``masks/*``, same stem |
| DAVIS | ``img/*``, ``gt/*``, same stem |
| COCO_MVal | ``img/*``, ``gt/*``, same stem |
| SBD | ``img/<id>.jpg``, ``inst/<id>.mat``, ids in ``train.txt`` / ``val.txt`` |
| PascalVOC | ``JPEGImages/<id>.jpg``, ``SegmentationObject/<id>.png``,
  ids in ``ImageSets/Segmentation/<split>.txt`` |

A sample is a dict ``{"image": uint8[H, W, 3], "gt": int8[H, W], "id": str}`` with one object per
sample (``gt``: 1 object, 0 background, -1 ignore). Instance datasets give one sample per
instance, with id ``"<image id>#<instance id>"``. Samples are ordered by image id, then
instance id.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samref_jax.data import decode
from samref_jax.data.decode import DataError
from samref_jax.paths import as_path

__all__ = [
    "DATASETS",
    "DatasetLayout",
    "FolderDataset",
    "ImageRecord",
    "get_layout",
    "iter_samples",
    "read_folder_dataset",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".gif"})


@dataclass(frozen=True)
class ImageRecord:
    """One image file and its mask file (before decoding)."""

    stem: str
    image_path: Path
    mask_path: Path


@dataclass(frozen=True)
class DatasetLayout:
    """How one dataset is laid out on disk and how its masks are decoded.

    ``kind`` is ``"pairs"`` (image and mask folders matched by file stem, one object per mask,
    decoded with ``rule``) or ``"sbd"`` / ``"voc"`` (id lists per split, instance maps).
    """

    name: str
    kind: str
    image_dir: str
    mask_dir: str
    splits: tuple[str, ...]
    rule: str = ""
    image_suffix: str = ".jpg"
    mask_suffix: str = ""
    description: str = ""

    @property
    def default_split(self) -> str:
        return "val" if "val" in self.splits else self.splits[0]

    # -- listing ---------------------------------------------------------------------------------

    def available_splits(self, root: str | Path) -> tuple[str, ...]:
        """Splits whose files exist under ``root`` (pair datasets: always their single split)."""
        if self.kind == "pairs":
            return self.splits
        return tuple(s for s in self.splits if self._split_file(as_path(root), s).is_file())

    def records(self, root: str | Path, split: str | None = None) -> list[ImageRecord]:
        """Image/mask file pairs of ``split``, sorted by stem; raises :class:`DataError`."""
        root = as_path(root)  # epath: a gs://... folder is listed and read as such
        split = split or self.default_split
        if split not in self.splits:
            raise ValueError(f"{self.name} has splits {self.splits}, not {split!r}")
        if not root.is_dir():
            raise DataError(f"{self.name}: dataset folder not found: {root}")
        if self.kind == "pairs":
            return self._pair_records(root)
        return self._listed_records(root, split)

    def _split_file(self, root: Path, split: str) -> Path:
        if self.kind == "voc":
            return root / "ImageSets" / "Segmentation" / f"{split}.txt"
        return root / f"{split}.txt"

    def _pair_records(self, root: Path) -> list[ImageRecord]:
        images = _index_by_stem(root / self.image_dir)
        masks = _index_by_stem(root / self.mask_dir)
        for stem, path in sorted(images.items()):
            if stem not in masks:
                raise DataError(
                    f"{self.name}: no mask for image {path} (expected "
                    f"{root / self.mask_dir / stem}{self.mask_suffix or '.*'})"
                )
        for stem, path in sorted(masks.items()):
            if stem not in images:
                raise DataError(
                    f"{self.name}: mask {path} matches no image in {root / self.image_dir}"
                )
        return [ImageRecord(s, images[s], masks[s]) for s in sorted(images)]

    def _listed_records(self, root: Path, split: str) -> list[ImageRecord]:
        list_file = self._split_file(root, split)
        if not list_file.is_file():
            raise DataError(f"{self.name}: missing split list {list_file}")
        ids = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
        records = []
        for stem in sorted(dict.fromkeys(ids)):
            image_path = root / self.image_dir / f"{stem}{self.image_suffix}"
            mask_path = root / self.mask_dir / f"{stem}{self.mask_suffix}"
            if not image_path.is_file():
                raise DataError(f"{self.name}: {list_file} lists {stem}; {image_path} is missing")
            if not mask_path.is_file():
                raise DataError(f"{self.name}: no mask for image {image_path} (no {mask_path})")
            records.append(ImageRecord(stem, image_path, mask_path))
        return records

    # -- decoding --------------------------------------------------------------------------------

    def read_instances(
        self, record: ImageRecord
    ) -> tuple[np.ndarray, list[int], np.ndarray | None]:
        """Instance map, instance ids and ignore mask of an instance-dataset record."""
        if self.kind == "sbd":
            return decode.read_sbd_instances(record.mask_path)
        if self.kind == "voc":
            return decode.read_voc_instances(record.mask_path)
        raise ValueError(f"{self.name} is not an instance dataset")

    def instance_ids(self, record: ImageRecord) -> list[int | None]:
        """Instance ids of a record (``[None]`` for single-object datasets)."""
        if self.kind == "pairs":
            return [None]
        return self.read_instances(record)[1]

    def decode(self, record: ImageRecord) -> list[dict]:
        """All samples of one record, decoding the image and the mask once."""
        image = decode.read_image(record.image_path)
        if self.kind == "pairs":
            gt = decode.read_semantic_mask(record.mask_path, self.rule)
            decode.check_same_size(image, gt, record.image_path, record.mask_path)
            return [{"image": image, "gt": gt, "id": record.stem}]
        seg, ids, ignore = self.read_instances(record)
        decode.check_same_size(image, seg, record.image_path, record.mask_path)
        return [
            {"image": image, "gt": decode.instance_gt(seg, i, ignore), "id": f"{record.stem}#{i}"}
            for i in ids
        ]


def _index_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"missing folder: {folder}")
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in out:
            raise DataError(f"two files share the stem {path.stem!r}: {out[path.stem]} and {path}")
        out[path.stem] = path
    return out


DATASETS: dict[str, DatasetLayout] = {
    layout.name: layout
    for layout in (
        DatasetLayout(
            "GrabCut",
            "pairs",
            "data_GT",
            "boundary_GT",
            ("test",),
            rule="grabcut",
            description="GrabCut (50 images, Rother et al. 2004), RITM layout.",
        ),
        DatasetLayout(
            "Berkeley",
            "pairs",
            "images",
            "masks",
            ("test",),
            rule="grabcut",
            description="Berkeley (100 instances, McGuinness & O'Connor 2010), RITM layout.",
        ),
        DatasetLayout(
            "DAVIS",
            "pairs",
            "img",
            "gt",
            ("test",),
            rule="davis",
            description="DAVIS-345 (345 frames, RITM's interactive subset of DAVIS 2017).",
        ),
        DatasetLayout(
            "COCO_MVal",
            "pairs",
            "img",
            "gt",
            ("test",),
            rule="coco_mval",
            description="COCO-MVal (800 COCO val2017 instances, f-BRS / RITM).",
        ),
        DatasetLayout(
            "SBD",
            "sbd",
            "img",
            "inst",
            ("train", "val"),
            image_suffix=".jpg",
            mask_suffix=".mat",
            description="SBD (Hariharan et al. 2011), one sample per instance.",
        ),
        DatasetLayout(
            "PascalVOC",
            "voc",
            "JPEGImages",
            "SegmentationObject",
            ("train", "val"),
            image_suffix=".jpg",
            mask_suffix=".png",
            description="PASCAL VOC 2012 SegmentationObject, one sample per instance.",
        ),
    )
}

_ALIASES = {
    "davis345": "DAVIS",
    "voc": "PascalVOC",
    "pascalvoc2012": "PascalVOC",
    "voc2012": "PascalVOC",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_layout(name: str) -> DatasetLayout:
    """Layout by name, case- and punctuation-insensitive (``"coco-mval"``, ``"davis345"``...)."""
    key = _key(name)
    for layout in DATASETS.values():
        if _key(layout.name) == key:
            return layout
    if key in _ALIASES:
        return DATASETS[_ALIASES[key]]
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def iter_samples(name: str, root: str | Path, split: str | None = None) -> Iterator[dict]:
    """Decode every sample of a dataset folder in order (each image decoded once)."""
    layout = get_layout(name)
    for record in layout.records(root, split):
        yield from layout.decode(record)


class FolderDataset(Sequence):
    """Random-access samples straight from an upstream folder (no preparation step).

    ``len`` and ``ids`` are known up front (instance datasets read every mask once to list their
    instances); ``ds[i]`` decodes lazily. Works as a ``grain.MapDataset.source``.
    """

    def __init__(self, name: str, root: str | Path, split: str | None = None) -> None:
        self.layout = get_layout(name)
        self.root = as_path(root)
        self.split = split or self.layout.default_split
        self._index: list[tuple[ImageRecord, int | None]] = [
            (rec, inst)
            for rec in self.layout.records(self.root, self.split)
            for inst in self.layout.instance_ids(rec)
        ]
        self._cache: tuple[ImageRecord, list[dict]] | None = None

    @property
    def ids(self) -> list[str]:
        return [rec.stem if inst is None else f"{rec.stem}#{inst}" for rec, inst in self._index]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        record, inst = self._index[index]
        if self._cache is None or self._cache[0] != record:
            self._cache = (record, self.layout.decode(record))
        samples = self._cache[1]
        if inst is None:
            return samples[0]
        wanted = f"{record.stem}#{inst}"
        return next(s for s in samples if s["id"] == wanted)

    def __repr__(self) -> str:
        return (
            f"FolderDataset({self.layout.name!r}, {str(self.root)!r}, split={self.split!r}, "
            f"n={len(self)})"
        )


def read_folder_dataset(name: str, root: str | Path, split: str | None = None) -> FolderDataset:
    """Samples of dataset ``name`` read directly from its upstream folder ``root``.

    Args:
      name: ``GrabCut``, ``Berkeley``, ``DAVIS``, ``COCO_MVal``, ``SBD`` or ``PascalVOC``.
      root: the dataset folder (e.g. ``.../GrabCut`` holding ``data_GT`` and ``boundary_GT``).
      split: ``None`` for the default (``test`` for single-split sets, ``val`` otherwise).

    Returns:
      A lazy sequence of ``{"image", "gt", "id"}`` dicts.
    """
    return FolderDataset(name, root, split)
