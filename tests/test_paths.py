"""Cloud locations (``gs://bucket/...``) reach the storage layer verbatim.

``pathlib.Path("gs://bucket/run")`` becomes ``gs:/bucket/run``; every user-given location goes
through ``samref_jax.paths.as_path`` (``etils.epath``) instead. A fake ``gs://`` backend for
epath serves ``gs://bucket/...`` from a local folder and records every path it is handed, so
these tests see the exact strings that would reach Cloud Storage; orbax and TFDS, which talk to
storage themselves, are replaced at their call sites by recorders.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from etils.epath import backend as backend_lib
from etils.epath import gpath

from samref_jax.paths import as_path, is_local

BUCKET = "gs://bucket"


class _FakeGcs(backend_lib._OsPathBackend):
    """epath backend for ``gs://``: files live under a local root; every path is recorded."""

    def __init__(self, root) -> None:
        self.root = pathlib.Path(root)  # the local side
        self.seen: list[str] = []

    def _local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith(BUCKET + "/") or path == BUCKET, f"mangled location {path!r}"
        self.seen.append(path)
        return os.path.join(self.root, path[len("gs://") :])

    def _uri(self, local: str) -> str:
        return "gs://" + os.path.relpath(local, self.root)

    def open(self, path, mode, *args, **kwargs):
        return super().open(self._local(path), mode, *args, **kwargs)

    def exists(self, path):
        return super().exists(self._local(path))

    def isdir(self, path):
        return super().isdir(self._local(path))

    def listdir(self, path):
        return super().listdir(self._local(path))

    def glob(self, path):
        return [self._uri(p) for p in super().glob(self._local(path))]

    def walk(self, top, *args, **kwargs):
        for root, dirs, files in super().walk(self._local(top), *args, **kwargs):
            yield self._uri(os.fspath(root)), dirs, files

    def makedirs(self, path, *args, **kwargs):
        return super().makedirs(self._local(path), *args, **kwargs)

    def mkdir(self, path, *args, **kwargs):
        return super().mkdir(self._local(path), *args, **kwargs)

    def rmtree(self, path):
        return super().rmtree(self._local(path))

    def remove(self, path):
        return super().remove(self._local(path))

    def rename(self, path, dst):
        return super().rename(self._local(path), self._local(dst))

    def replace(self, path, dst):
        if self.isdir(dst):  # as the parent does, on the gs:// name
            raise IsADirectoryError(f"Cannot overwrite: {dst} is a directory")
        os.replace(self._local(path), self._local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self._local(path), self._local(dst), overwrite)

    def stat(self, path):
        return super().stat(self._local(path))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The fake ``gs://`` backend; ``gs://bucket/x`` is ``tmp_path / "bucket" / "x"``."""
    fake = _FakeGcs(tmp_path)
    (tmp_path / "bucket").mkdir()
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    return fake


def test_as_path_keeps_uris_and_anchors_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = as_path(f"{BUCKET}/run", absolute=True)
    assert os.fspath(uri) == f"{BUCKET}/run" and os.fspath(uri / "checkpoints").startswith("gs://")
    assert not is_local(uri) and is_local("run") and is_local(tmp_path)
    assert os.fspath(as_path("run", absolute=True)) == os.fspath(tmp_path / "run")


def test_trainer_workdir_and_data_dir(gcs, monkeypatch):
    """``train(config, "gs://bucket/run")`` writes config.json into the bucket and prepares the
    data under ``gs://bucket/run/tfds`` from ``gs://bucket/COCO_MVal``."""
    from samref_jax.training import trainer
    from samref_jax.training.testing import tiny_test_config

    class _Stop(Exception):
        pass

    got = {}

    def fake_prepare_source(config, data_dir):
        got["data_dir"], got["manual_dir"] = os.fspath(data_dir), config.data.manual_dir
        raise _Stop

    monkeypatch.setattr(trainer, "prepare_source", fake_prepare_source)
    cfg = tiny_test_config("full", 64)
    cfg.data.manual_dir = f"{BUCKET}/COCO_MVal"
    with pytest.raises(_Stop):
        trainer.train(cfg, f"{BUCKET}/run", progress=False)
    assert got == {"data_dir": f"{BUCKET}/run/tfds", "manual_dir": f"{BUCKET}/COCO_MVal"}
    assert f"{BUCKET}/run/config.json" in gcs.seen
    assert json.loads((gcs.root / "bucket/run/config.json").read_text())["mode"] == "full"


def test_prepare_source_hands_tfds_the_uris(gcs, monkeypatch):
    """The TFDS builder gets ``data_dir`` and ``manual_dir`` as the exact gs:// strings, also
    for the ``SAMREF_DATA_DIR`` default of the manual directory."""
    from samref_jax.data import tfds_builders
    from samref_jax.data.folders import get_layout
    from samref_jax.training.pipeline import prepare_source
    from samref_jax.training.testing import tiny_test_config

    calls = []

    class FakeBuilder:
        LAYOUT = get_layout("COCO_MVal")

        def __init__(self, data_dir, file_format):
            calls.append(("data_dir", data_dir))

        def download_and_prepare(self, download_config):
            calls.append(("manual_dir", os.fspath(download_config.manual_dir)))

        def is_prepared(self):
            return True

        def as_data_source(self, split):
            return ["example"]

    monkeypatch.setitem(tfds_builders.BUILDERS, "COCO_MVal", FakeBuilder)
    monkeypatch.setenv("SAMREF_DATA_DIR", f"{BUCKET}/data")
    cfg = tiny_test_config("full", 64)
    cfg.data.manual_dir = ""  # the default: $SAMREF_DATA_DIR/COCO_MVal
    assert prepare_source(cfg, f"{BUCKET}/run/tfds") == ["example"]
    assert calls == [
        ("data_dir", f"{BUCKET}/run/tfds"),
        ("manual_dir", f"{BUCKET}/data/COCO_MVal"),
        ("data_dir", f"{BUCKET}/run/tfds"),
    ]
    assert (gcs.root / "bucket/run/tfds").is_dir()  # made through epath


def test_manual_folder_is_read_from_the_bucket(gcs, tmp_path):
    """The upstream folder (what TFDS converts) is listed and decoded through epath."""
    from samref_jax.data.folders import read_folder_dataset
    from samref_jax.training.testing import write_fake_coco_mval

    local = write_fake_coco_mval(tmp_path / "bucket" / "COCO_MVal", n=3)
    remote = read_folder_dataset("COCO_MVal", f"{BUCKET}/COCO_MVal")
    ref = read_folder_dataset("COCO_MVal", local)
    assert remote.ids == ref.ids and len(remote) == 3
    for i in range(len(ref)):
        np.testing.assert_array_equal(remote[i]["image"], ref[i]["image"])
        np.testing.assert_array_equal(remote[i]["gt"], ref[i]["gt"])
    assert any(p.startswith(f"{BUCKET}/COCO_MVal/img/") for p in gcs.seen)


def test_train_checkpoints_go_to_the_bucket(gcs, monkeypatch):
    import orbax.checkpoint as ocp

    from samref_jax.training.checkpointing import TrainCheckpointer

    seen = []

    class FakeManager:
        def __init__(self, directory, options=None, item_names=None):
            seen.append(os.fspath(directory))

    monkeypatch.setattr(ocp, "CheckpointManager", FakeManager)
    ckpt = TrainCheckpointer(f"{BUCKET}/run/checkpoints")
    assert seen == [f"{BUCKET}/run/checkpoints"]
    assert os.fspath(ckpt.directory) == f"{BUCKET}/run/checkpoints"


def test_model_checkpoint_round_trip_in_the_bucket(gcs, monkeypatch):
    """save/load_model_checkpoint and resolve_checkpoint with a gs:// directory: orbax gets
    ``gs://bucket/models/m/params``; no local staging folder or rename on an object store."""
    import orbax.checkpoint as ocp

    from samref_jax.checkpoint import CheckpointError, load_model_checkpoint, save_model_checkpoint
    from samref_jax.samref.io import resolve_checkpoint

    store: dict[str, object] = {}

    class FakeCheckpointer:
        def save(self, directory, tree, force=False):
            directory = as_path(directory)
            store[os.fspath(directory)] = tree
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "written").write_text("1")

        def wait_until_finished(self):
            pass

        def restore(self, directory):
            return store[os.fspath(directory)]

    monkeypatch.setattr(ocp, "StandardCheckpointer", FakeCheckpointer)
    uri = f"{BUCKET}/models/m"
    tree = {"sam": {"w": np.arange(3, dtype=np.float32)}}
    out = save_model_checkpoint(uri, tree, {"model_type": "tiny"})
    assert os.fspath(out) == uri and list(store) == [f"{uri}/params"]
    assert os.fspath(resolve_checkpoint(uri)) == uri
    loaded, meta = load_model_checkpoint(uri)
    np.testing.assert_array_equal(loaded["sam"]["w"], tree["sam"]["w"])
    assert meta["model_type"] == "tiny"
    assert sorted(os.listdir(gcs.root / "bucket/models")) == ["m"]  # no staging sibling
    # Replacing needs overwrite, as locally.
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_model_checkpoint(uri, tree, {"model_type": "tiny"}, overwrite=False)
    save_model_checkpoint(uri, tree, {"model_type": "new"})
    assert load_model_checkpoint(uri)[1]["model_type"] == "new"


def test_evaluation_output_folder_in_the_bucket(gcs):
    from samref_jax.evaluation.evaluator import _Run, load_records, run_folders
    from samref_jax.evaluation.report import write_metrics_markdown

    folders = run_folders(f"{BUCKET}/eval", ["full", "sam"], {"model": "m"}, None, 3, None)
    assert {m: os.fspath(f) for m, (f, _) in folders.items()} == {
        "full": f"{BUCKET}/eval/full",
        "sam": f"{BUCKET}/eval/sam",
    }
    folder, ident = folders["full"]
    run = _Run(folder, 3, ident)
    rec = {"id": "a", "index": 0, "ious": [0.5, 0.9, 0.95], "max_clicks": 3}
    run.add(rec, np.eye(4, dtype=bool))
    run.close()
    assert load_records(f"{BUCKET}/eval/full/samples.jsonl") == {"a": rec}
    assert (gcs.root / "bucket/eval/full/masks/00000_a.png").is_file()
    assert (gcs.root / "bucket/eval/full/run.json").is_file()
    write_metrics_markdown({"NoC@90": 2.0, "mIoU@k": [0.5, 0.9]}, f"{BUCKET}/eval/metrics.md")
    assert (gcs.root / "bucket/eval/metrics.md").is_file()
