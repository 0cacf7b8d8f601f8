"""Interactive-segmentation datasets: upstream folder readers and TFDS/Grain builders."""

from samref_jax.data.decode import DataError, read_image
from samref_jax.data.folders import (
    DATASETS,
    FolderDataset,
    get_layout,
    iter_samples,
    read_folder_dataset,
)

__all__ = [
    "DATASETS",
    "DataError",
    "FolderDataset",
    "get_layout",
    "grain_source",
    "iter_samples",
    "prepare",
    "read_folder_dataset",
    "read_image",
]


def prepare(name, manual_dir, data_dir):  # noqa: D103 - thin lazy wrapper, see tfds_builders
    from samref_jax.data.tfds_builders import prepare as _prepare

    return _prepare(name, manual_dir, data_dir)


def grain_source(name, data_dir, split=None):  # noqa: D103
    from samref_jax.data.tfds_builders import grain_source as _grain_source

    return _grain_source(name, data_dir, split)
