"""TFDS builders (ArrayRecord, no TensorFlow) for the interactive-segmentation sets, read by Grain.

Recipe (docs/design.md, 'TFDS without TensorFlow'): features are ``tfds.features.Tensor``
with zlib encoding (``tfds.features.Image`` would need TensorFlow to encode), ``_info`` is an
explicit ``tfds.core.DatasetInfo``, files are ``array_record``, and the upstream folder is the
manual directory::

    builder = prepare("GrabCut", manual_dir="~/data/GrabCut", data_dir="~/tfds")
    source = grain_source("GrabCut", data_dir="~/tfds")          # random access, len() known
    ds = grain.MapDataset.source(source).map(...)

Each record is ``{"image": uint8[H, W, 3], "gt": int8[H, W], "id": bytes}`` (TFDS returns
text as ``bytes``; ``gt``: 1 object, 0 background, -1 ignore). Examples keep the folder reader's
order (shuffling disabled), so record ``i`` of a split is sample ``i`` of
:func:`samref_jax.data.folders.read_folder_dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from samref_jax.data.folders import DATASETS, DatasetLayout, get_layout
from samref_jax.paths import as_path

__all__ = ["BUILDERS", "builder", "grain_source", "prepare"]

_INSTRUCTIONS = """\
Download the {name} benchmark yourself and pass its folder as the manual directory, keeping the
upstream layout: {layout}.
"""

_LAYOUT_TEXT = {
    "GrabCut": "data_GT/* images and boundary_GT/*.bmp masks with the same stem",
    "Berkeley": "images/*.jpg and masks/*.png with the same stem",
    "DAVIS": "img/*.jpg and gt/*.png with the same stem (RITM's DAVIS-345)",
    "COCO_MVal": "img/*.jpg and gt/*.png with the same stem",
    "SBD": "img/<id>.jpg, inst/<id>.mat (GTinst), train.txt and val.txt (the 'dataset' folder)",
    "PascalVOC": "JPEGImages/, SegmentationObject/ and ImageSets/Segmentation/<split>.txt",
}


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder: one example per object instance of an upstream folder."""

    LAYOUT: DatasetLayout
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (samref-jax)."}
    # No checksums file (manual download). Also sidesteps TFDS's package-resource lookup, which
    # imports the optional ``importlib_resources`` for builders living inside a package.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.LAYOUT.description,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(None, None, 3), dtype=np.uint8, encoding="zlib"
                    ),
                    "gt": tfds.features.Tensor(shape=(None, None), dtype=np.int8, encoding="zlib"),
                    "id": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = as_path(dl_manager.manual_dir)
        splits = self.LAYOUT.available_splits(root)
        if not splits:
            raise FileNotFoundError(
                f"{self.LAYOUT.name}: no split list under {root} (looked for {self.LAYOUT.splits})"
            )
        # Listing first makes a missing or unmatched mask fail before anything is written.
        return {s: self._generate_examples(self.LAYOUT.records(root, s)) for s in splits}

    def _generate_examples(self, records: list) -> Any:
        for record in records:
            for sample in self.LAYOUT.decode(record):
                yield sample["id"], sample


def _make_builder(layout: DatasetLayout) -> type[_FolderBuilder]:
    attrs = {
        "LAYOUT": layout,
        "name": "samref_" + layout.name.lower(),
        "MANUAL_DOWNLOAD_INSTRUCTIONS": _INSTRUCTIONS.format(
            name=layout.name, layout=_LAYOUT_TEXT[layout.name]
        ),
        "__doc__": f"TFDS builder for {layout.description}",
        "__module__": __name__,
    }
    return type(layout.name + "Builder", (_FolderBuilder,), attrs, skip_registration=True)


BUILDERS: dict[str, type[_FolderBuilder]] = {n: _make_builder(lay) for n, lay in DATASETS.items()}
GrabCutBuilder = BUILDERS["GrabCut"]
BerkeleyBuilder = BUILDERS["Berkeley"]
DAVISBuilder = BUILDERS["DAVIS"]
COCO_MValBuilder = BUILDERS["COCO_MVal"]
SBDBuilder = BUILDERS["SBD"]
PascalVOCBuilder = BUILDERS["PascalVOC"]


def builder(name: str, data_dir: str | Path) -> _FolderBuilder:
    """The (possibly already prepared) builder of dataset ``name`` under ``data_dir``."""
    cls = BUILDERS[get_layout(name).name]
    return cls(data_dir=str(as_path(data_dir).expanduser()), file_format="array_record")


def prepare(name: str, manual_dir: str | Path, data_dir: str | Path) -> _FolderBuilder:
    """Convert the upstream folder ``manual_dir`` into ArrayRecord files under ``data_dir``.

    Does nothing if the dataset is already prepared there. Returns the builder.
    """
    b = builder(name, data_dir)
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(as_path(manual_dir).expanduser())
        )
    )
    return b


def grain_source(name: str, data_dir: str | Path, split: str | None = None) -> Any:
    """Random-access ``ArrayRecordDataSource`` of a prepared split, for ``grain.MapDataset.source``.

    ``split=None`` gives the dataset's default split (``test``, or ``val`` for SBD/PascalVOC).
    """
    b = builder(name, data_dir)
    split = split or b.LAYOUT.default_split
    if not b.is_prepared():
        raise FileNotFoundError(
            f"{b.LAYOUT.name} is not prepared under {data_dir}; run prepare() first"
        )
    return b.as_data_source(split=split)
