"""The demo's mask files stay bounded however many actions a server sees (no browser needed)."""

from __future__ import annotations

import gc

import numpy as np
from PIL import Image

from tests.demo.test_demo_app import _FakePredictor


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_mask_files_keep_each_users_latest_only(tmp_path, monkeypatch):
    from samref_jax.demo import app

    image = tmp_path / "a.png"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(image)
    work = tmp_path / "work"
    be = app.DemoBackend(_FakePredictor(), workdir=work)
    s = be.load(image)
    paths = []
    for i in range(40):  # clicks, undos and resets, each followed by the page's mask download
        if i % 10 == 9:
            be.reset(s)
        elif i % 4 == 3:
            be.undo(s)
        else:
            be.click(s, 5 + i % 30, 5 + i % 20, i % 3 != 2)
        path = be.mask_file(s)
        if path is not None:
            paths.append(path)
            assert _files(work) == [path]  # the latest only, a new path every time
    assert len(set(paths)) == len(paths) > 20
    assert np.asarray(Image.open(paths[-1])).shape == (40, 50)

    monkeypatch.setattr(app, "MAX_MASK_USERS", 3)
    users = [be.load(image) for _ in range(6)]
    latest = []
    for u in users:
        be.click(u, 10, 10, True)
        latest.append(be.mask_file(u))
    assert len(list(work.iterdir())) == 3
    assert _files(work) == sorted(latest[-3:])  # the most recent users' files


def test_default_workdir_is_removed_with_the_backend(tmp_path):
    from samref_jax.demo.app import DemoBackend

    image = tmp_path / "a.png"
    Image.fromarray(np.full((30, 20, 3), 150, np.uint8)).save(image)
    be = DemoBackend(_FakePredictor())
    s = be.load(image)
    be.click(s, 5, 5, True)
    work = be.workdir
    assert be.mask_file(s).is_file()
    del be, s
    gc.collect()
    assert not work.exists()  # a TemporaryDirectory: also removed at interpreter exit
