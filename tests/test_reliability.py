"""User-facing commands lose nothing and fail with one clear line (exit status 2).

Converter and checkpoint writes (refuse a non-empty output, atomic replace, NaN weights,
refused pickles), the one image reader, the evaluator's user errors, ``samref segment``, the
trainer's resume checks and the predictors' input checks; a fuzz test at the end pushes a few
hundred generated bad inputs through the command-line entry points in-process.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from samref_jax.checkpoint import CheckpointError, load_model_checkpoint, save_model_checkpoint


def _one_error_line(err: str, pattern: str) -> str:
    """The single non-empty stderr line, which must match ``pattern``; no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ converter
@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    """A tiny official-layout SAM .pth, and the patches that let main() convert it."""
    from samref_jax.sam import sam_config
    from tests.sam_reference import random_torch_sam, state_dict_numpy, torch

    sd = state_dict_numpy(random_torch_sam(sam_config("tiny"), seed=5))
    folder = tmp_path_factory.mktemp("pth")
    good = folder / "tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, good)
    bad = dict(sd)
    key = "mask_decoder.iou_token.weight"
    bad[key] = bad[key].copy()
    bad[key][0, 0] = np.nan
    nan = folder / "nan.pth"
    torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, nan)
    return good, nan


@pytest.fixture
def tiny_convert(monkeypatch):
    from samref_jax.sam import convert as conv
    from samref_jax.sam import sam_config

    cfg = sam_config("tiny")
    orig = conv.convert_state_dict
    monkeypatch.setattr(conv, "convert_state_dict", lambda sd, mt=None: orig(sd, config=cfg))
    monkeypatch.setattr(conv, "sam_config", lambda name: cfg)
    return conv.main


def test_convert_refuses_non_empty_output_unless_force(tmp_path, tiny_pth, tiny_convert, capsys):
    good, _ = tiny_pth
    out = tmp_path / "ck"
    assert tiny_convert(["--checkpoint", str(good), "--output", str(out)]) == 0
    before = (out / "metadata.json").read_text()
    capsys.readouterr()
    assert tiny_convert(["--checkpoint", str(good), "--output", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "already holds a checkpoint.*--force")
    assert (out / "metadata.json").read_text() == before
    (out / "stray.txt").write_text("from the old checkpoint")
    assert tiny_convert(["--checkpoint", str(good), "--output", str(out), "--force"]) == 0
    assert not (out / "stray.txt").exists()  # replaced as a whole
    load_model_checkpoint(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no staging folder left behind

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a checkpoint")
    capsys.readouterr()
    assert tiny_convert(["--checkpoint", str(good), "--output", str(mine), "--force"]) == 2
    _one_error_line(capsys.readouterr().err, "holds no samref-jax checkpoint")
    assert (mine / "notes.txt").read_text() == "not a checkpoint"


def test_killed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    out = tmp_path / "ck"
    old = {"sam": {"w": np.arange(6, dtype=np.float32)}}
    save_model_checkpoint(out, old, {"model_type": "old"})

    def killed(self):
        raise KeyboardInterrupt  # a kill while orbax is writing

    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model_checkpoint(out, {"sam": {"w": np.zeros(6, np.float32)}}, {"model_type": "new"})
    monkeypatch.undo()
    tree, meta = load_model_checkpoint(out)
    assert meta["model_type"] == "old"
    np.testing.assert_array_equal(tree["sam"]["w"], old["sam"]["w"])
    # The next save cleans the torn staging folder up and succeeds.
    save_model_checkpoint(out, {"sam": {"w": np.ones(6, np.float32)}}, {"model_type": "new"})
    assert load_model_checkpoint(out)[1]["model_type"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_refuses_a_file_or_foreign_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_model_checkpoint(tmp_path / "file", {"sam": {"w": np.zeros(1)}}, {})
    with pytest.raises(CheckpointError, match="holds no samref-jax checkpoint"):
        save_model_checkpoint(tmp_path, {"sam": {"w": np.zeros(1)}}, {})


def test_convert_refuses_nan_weights(tmp_path, tiny_pth, tiny_convert, capsys):
    _, nan = tiny_pth
    out = tmp_path / "ck"
    assert tiny_convert(["--checkpoint", str(nan), "--output", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "NaN or Inf.*mask_decoder.iou_token.weight")
    assert not out.exists()


def test_convert_reports_a_refused_pickle(tmp_path, capsys):
    import os

    from samref_jax.sam.convert import main
    from tests.sam_reference import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.pth"
    torch.save({"a": torch.zeros(2), "b": Evil()}, evil)
    assert main(["--checkpoint", str(evil), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err, "was refused: it asks to call or build .*system")
    assert "nothing was executed" in line
    assert "weights_only" not in err and "truncated" not in err


# ------------------------------------------------------------------------------ image reader
def test_read_image_is_the_one_reader():
    import samref_jax
    from samref_jax import cli
    from samref_jax.data import decode

    assert samref_jax.read_image is decode.read_image
    assert "read_image" in samref_jax.__all__
    assert cli.read_image_or_fail.__code__.co_names.count("read_image")


def test_read_image_applies_exif_orientation(tmp_path):
    from PIL import Image

    from samref_jax.data.decode import read_image

    arr = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high; a red left edge
    arr[:, :4, 0] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[274] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    assert out[:4, :, 0].mean() > 200  # the red edge is now on top


def test_read_image_scales_16_bit_and_float_like_the_array_api(tmp_path):
    from PIL import Image

    from samref_jax.data.decode import DataError, read_image
    from samref_jax.sam.predictor import as_rgb_uint8

    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey16).save(path)
    np.testing.assert_array_equal(read_image(path), as_rgb_uint8(grey16))
    assert read_image(path)[0, 1, 0] == round(1000 / 257)  # not clipped to 255

    flt = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / "float.tif"
    Image.fromarray(flt, mode="F").save(path)
    np.testing.assert_array_equal(read_image(path), as_rgb_uint8(flt))
    Image.fromarray(flt * 7, mode="F").save(path)
    with pytest.raises(DataError, match=r"float.tif: F image: float images must hold values"):
        read_image(path)


def test_too_small_image_says_the_short_side_rounds_to_zero(tmp_path, capsys):
    from PIL import Image

    from samref_jax import cli
    from samref_jax.sam.transforms import check_frame_size

    with pytest.raises(ValueError, match="500x1 pixels .*short side rounds to 0"):
        check_frame_size(1, 500, 128)
    check_frame_size(2, 500, 128)  # 2 * 128 / 500 = 0.51 rounds to 1: fine
    path = tmp_path / "line.png"
    Image.fromarray(np.full((1, 500, 3), 90, np.uint8)).save(path)
    rc = cli.main(["segment", str(path), "--click", "10,0,+", "--out", str(tmp_path / "o")])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, "short side rounds to 0 pixels")
    assert not (tmp_path / "o").exists()
