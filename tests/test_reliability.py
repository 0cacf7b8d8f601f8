"""User-facing commands lose nothing and fail with one clear line (exit status 2).

Converter and checkpoint writes (refuse a non-empty output, atomic replace, NaN weights,
refused pickles), the one image reader, the evaluator's user errors, ``samref segment``, the
trainer's resume checks and the predictors' input checks; a fuzz test at the end pushes a few
hundred generated bad inputs through the command-line entry points in-process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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


def test_convert_ctrl_c_is_one_line_and_keeps_the_old_checkpoint(
    tmp_path, tiny_pth, tiny_convert, capsys, monkeypatch
):
    """Ctrl-C while converting: exit 130, one line, --output untouched (here: the previous
    checkpoint, being replaced with --force)."""
    from samref_jax.sam import convert as conv

    good, _ = tiny_pth
    out = tmp_path / "ck"
    assert tiny_convert(["--checkpoint", str(good), "--output", str(out)]) == 0
    before = (out / "metadata.json").read_text()
    capsys.readouterr()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "load_torch_state_dict", ctrl_c)
    assert tiny_convert(["--checkpoint", str(good), "--output", str(out), "--force"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "convert_weights.py: interrupted; --output was left as it was"
    ], err
    assert (out / "metadata.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


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
    from samref_jax.sam.transforms import as_rgb_uint8

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


# ------------------------------------------------------------------------------ evaluator
class _Disk:
    """A fast click 'model' for the evaluator: a disk around each positive click."""

    made = 0

    def __init__(self, interrupt_at: int | None = None) -> None:
        type(self).made += 1
        self.interrupt_at, self.images = interrupt_at, 0

    def set_image(self, image):
        if self.interrupt_at is not None and self.images >= self.interrupt_at:
            raise KeyboardInterrupt
        self.images += 1
        self.shape = np.asarray(image).shape[:2]
        self.reset()

    def prepare_image(self, image):
        return image

    def reset(self):
        self.mask = np.zeros(self.shape, bool)

    def click(self, x, y, positive=True):
        yy, xx = np.ogrid[: self.shape[0], : self.shape[1]]
        self.mask[(yy - y) ** 2 + (xx - x) ** 2 <= 64] = positive
        return {"mask": self.mask.copy()}


def _grabcut_folder(root: Path, n: int = 4, size: tuple[int, int] = (24, 32)) -> Path:
    """A GrabCut-layout folder with ``n`` small image/mask pairs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "data_GT").mkdir(parents=True)
    (root / "boundary_GT").mkdir()
    h, w = size
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "data_GT" / f"im{i}.jpg", quality=90
        )
        mask = np.zeros((h, w), np.uint8)
        mask[4 : 4 + 6 + i, 6:20] = 255
        Image.fromarray(mask).save(root / "boundary_GT" / f"im{i}.png")
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not


@pytest.fixture
def eval_cli(monkeypatch, capsys):
    """``samref-eval`` in-process with the disk model: returns run(*args) -> (rc, err)."""
    import importlib

    cli = importlib.import_module("samref_jax.evaluation.evaluate")

    made = []

    def fake(factory, checkpoint, mode, dtype="float32"):
        made.append((checkpoint, mode))
        return _Disk(**fake.kwargs)

    fake.kwargs = {}
    monkeypatch.setattr(cli, "_make_predictor", fake)

    def run(*args):
        capsys.readouterr()
        rc = cli.main([str(a) for a in args] + ["--no-progress"])
        return rc, capsys.readouterr().err

    run.made, run.fake = made, fake
    return run


def _bad_setups(tmp: Path):
    """(name, args, error pattern): each must fail before the model is loaded."""
    good = _grabcut_folder(tmp / "good" / "GrabCut")
    base = ["--checkpoint", "tiny", "--dataset", "GrabCut", "--max-clicks", "3"]
    missing_mask = _grabcut_folder(tmp / "missing_mask")
    (missing_mask / "boundary_GT" / "im1.png").unlink()
    sized = _grabcut_folder(tmp / "sized")
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(sized / "boundary_GT" / "im2.png")
    corrupt = _grabcut_folder(tmp / "corrupt")
    (corrupt / "data_GT" / "im0.jpg").write_bytes(b"not a jpeg at all")
    empty = tmp / "empty"
    (empty / "data_GT").mkdir(parents=True)
    (empty / "boundary_GT").mkdir()
    out = ["--output", tmp / "out"]
    return [
        ("dataset", [*base, "--dataset", "Nope", "--data-dir", good, *out], "unknown dataset"),
        ("data dir", [*base, "--data-dir", tmp / "absent", *out], "no GrabCut folder"),
        ("no data", [*base, *out], "give --data-dir"),
        ("missing mask", [*base, "--data-dir", missing_mask, *out], "no mask for image.*im1"),
        ("mis-sized", [*base, "--data-dir", sized, *out], "im2.png is 10x10 but image"),
        ("corrupt", [*base, "--data-dir", corrupt, *out], "im0.jpg: not a readable image"),
        ("empty", [*base, "--data-dir", empty, *out], "no GrabCut samples found"),
        ("no ckpt", ["--data-dir", good, *out], "give --checkpoint"),
        ("bad ckpt", ["--checkpoint", tmp / "nope", "--data-dir", good, *out], "does not exist"),
        ("clicks 0", [*base, "--max-clicks", "0", "--data-dir", good, *out], "at least 1"),
        ("clicks 25", [*base, "--max-clicks", "25", "--data-dir", good, *out], "outside 1..24"),
        ("limit 0", [*base, "--limit", "0", "--data-dir", good, *out], "--limit must be"),
        ("limit -3", [*base, "--limit", "-3", "--data-dir", good, *out], "--limit must be"),
    ]


def test_eval_user_errors_are_one_line_before_the_model_loads(tmp_path, eval_cli):
    for name, args, pattern in _bad_setups(tmp_path):
        rc, err = eval_cli(*args)
        assert rc == 2, name
        _one_error_line(err, pattern)
        assert eval_cli.made == [], name
        assert not (tmp_path / "out" / "metrics.json").exists(), name


def test_eval_usage_errors_are_one_line(tmp_path, capsys):
    from samref_jax.evaluation.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["--output", str(tmp_path), "--max-clicks", "x"])
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, "samref-eval: error: argument --max-clicks")
    assert main(["compare", str(tmp_path / "none.json"), "--output", str(tmp_path / "c")]) == 2
    _one_error_line(capsys.readouterr().err, "samref-eval compare: error: .*none.json")


def test_eval_damaged_resume_file_names_file_and_line(tmp_path, eval_cli):
    data = _grabcut_folder(tmp_path / "GrabCut")
    args = ["--checkpoint", "tiny", "--data-dir", data, "--max-clicks", "2", "--output"]
    out = tmp_path / "out"
    assert eval_cli(*args, out)[0] == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace(":", "", 1)  # a flipped byte
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    eval_cli.made.clear()
    rc, err = eval_cli(*args, out)
    assert rc == 2 and eval_cli.made == []
    _one_error_line(err, r"samples.jsonl:2: not a JSON record")


def test_eval_refuses_to_resume_another_run(tmp_path, eval_cli):
    data = _grabcut_folder(tmp_path / "GrabCut")
    out = tmp_path / "out"
    args = ["--checkpoint", "tiny", "--data-dir", data, "--max-clicks", "2", "--output", out]
    assert eval_cli(*args, "--mode", "sam")[0] == 0
    run = json.loads((out / "run.json").read_text())
    assert run["checkpoint"] == "tiny" and len(run["checkpoint_sha256"]) == 64
    assert run["mode"] == "sam" and run["dataset"] == "GrabCut" and run["max_clicks"] == 2
    assert run["split"] == "test" and run["method"] == "samref" and "stop_iou" in run
    eval_cli.made.clear()
    for other in (["--mode", "full"], ["--checkpoint", "tiny-sam", "--mode", "sam"]):
        rc, err = eval_cli(*args, *other)
        assert rc == 2 and eval_cli.made == []
        _one_error_line(err, "holds another run.*use a new output folder")
    assert eval_cli(*args, "--mode", "sam")[0] == 0  # the same run resumes


def test_eval_skip_bad_records_failures_and_metrics_are_strict_json(tmp_path, eval_cli):
    from PIL import Image

    data = _grabcut_folder(tmp_path / "GrabCut", n=5)
    _truncate(data / "data_GT" / "im1.jpg")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "boundary_GT" / "im3.png")
    out = tmp_path / "out"
    args = ["--checkpoint", "tiny", "--data-dir", data, "--max-clicks", "2", "--output", out]
    rc, err = eval_cli(*args, "--skip-bad")
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 3 and metrics["num_failed"] == 2
    assert not metrics["complete"]
    failed = {f["id"]: f["reason"] for f in metrics["failed"]}
    assert set(failed) == {"im1", "im3"}
    assert "truncated" in failed["im1"] and "is 10x10" in failed["im3"]
    assert len((out / "failed.jsonl").read_text().splitlines()) == 2

    # Nothing evaluable: null metrics, never NaN, and not "complete".
    for i in range(5):
        _truncate(data / "data_GT" / f"im{i}.jpg")
    out2 = tmp_path / "none"
    assert eval_cli(*args[:-1], out2, "--skip-bad")[0] == 0
    text = (out2 / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert metrics["num_failed"] == 5 and metrics["complete"] is False
    assert metrics["NoC@90"] is None


@pytest.mark.parametrize("prefetch", [True, False])
def test_eval_bad_sample_stops_after_writing_the_ones_before(tmp_path, eval_cli, prefetch):
    data = _grabcut_folder(tmp_path / "GrabCut")
    _truncate(data / "data_GT" / "im2.jpg")
    out = tmp_path / "out"
    args = ["--checkpoint", "tiny", "--data-dir", data, "--max-clicks", "2", "--output", out]
    rc, err = eval_cli(*args, *([] if prefetch else ["--no-prefetch"]))
    assert rc == 2
    _one_error_line(err, r"sample 'im2' \(index 2\): .*truncated")
    ids = [json.loads(x)["id"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert ids == ["im0", "im1"]  # im1 finished before im2 failed: written


def test_eval_ctrl_c_is_one_line_and_keeps_finished_samples(tmp_path, eval_cli):
    data = _grabcut_folder(tmp_path / "GrabCut")
    out = tmp_path / "out"
    eval_cli.fake.kwargs = {"interrupt_at": 2}
    args = ["--checkpoint", "tiny", "--data-dir", data, "--max-clicks", "2", "--output", out]
    rc, err = eval_cli(*args, "--no-prefetch")
    assert rc == 130
    _one_error_line(err, "interrupted; finished samples are kept")
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------ samref segment
@pytest.fixture
def segment_no_model(monkeypatch, capsys, tmp_path):
    """``samref segment`` in-process whose model must never be loaded: run(*args) -> (rc, err)."""
    from PIL import Image

    from samref_jax import cli

    def never(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "load_predictor", never)
    image = tmp_path / "img.png"
    Image.fromarray(np.full((20, 30, 3), 100, np.uint8)).save(image)

    def run(*args):
        capsys.readouterr()
        rc = cli.main(["segment", str(image), *map(str, args)])
        return rc, capsys.readouterr().err

    return run


def test_segment_checks_out_before_any_compute(tmp_path, segment_no_model):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    rc, err = segment_no_model("--click", "5,5,+", "--out", a_file / "sub" / "dir")
    assert rc == 2
    _one_error_line(err, "cannot be created: .*file.txt is a file")
    rc, err = segment_no_model("--click", "5,5,+", "--out", a_file)
    assert rc == 2
    _one_error_line(err, "--out is not a folder")
    (tmp_path / "o" / "mask.png").mkdir(parents=True)
    rc, err = segment_no_model("--click", "5,5,+", "--out", tmp_path / "o")
    assert rc == 2
    _one_error_line(err, "mask.png is a folder")


class _InterruptedPredictor:
    """A stand-in predictor whose click (or nothing) raises KeyboardInterrupt, as Ctrl-C does."""

    def __init__(self, interrupt_click: bool) -> None:
        self.interrupt_click = interrupt_click

    def set_image(self, image):
        self.shape = image.shape[:2]

    def click(self, x, y, positive=True):
        if self.interrupt_click:
            raise KeyboardInterrupt
        from samref_jax.samref.predictor import ClickResult

        mask = np.zeros(self.shape, bool)
        mask[2:8, 3:9] = True
        logits = mask.astype(np.float32)
        return ClickResult(
            mask=mask, logits=logits, sam_mask=mask, global_mask=mask, window=None, score=0.5
        )


@pytest.mark.parametrize("at", ["click", "overlay"])
def test_segment_ctrl_c_is_one_line_and_exit_130(tmp_path, segment_no_model, monkeypatch, at):
    """Ctrl-C during the clicks writes nothing; during the overlay keeps the finished mask.png
    (files are written through a temporary name: none torn, no temporary left)."""
    from PIL import Image

    from samref_jax import cli, viz

    monkeypatch.setattr(cli, "load_predictor", lambda *a, **k: _InterruptedPredictor(at == "click"))

    def interrupted_overlay(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(viz, "overlay", interrupted_overlay)
    out = tmp_path / "o"
    rc, err = segment_no_model("--click", "5,5,+", "--out", out)
    assert rc == 130
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("samref segment: interrupted; "), err
    if at == "click":
        assert lines[0].endswith(f"wrote nothing to {out}")
        assert not out.exists() or not any(out.iterdir())
    else:
        assert lines[0].endswith(f"wrote {out / 'mask.png'}, not {out / 'overlay.png'}")
        assert sorted(p.name for p in out.iterdir()) == ["mask.png"]
        assert np.asarray(Image.open(out / "mask.png")).max() == 255


@pytest.mark.parametrize(
    "click", ["nan,3", "3,nan,+", "inf,2", "1e3,2", "\uff19,3", "9" * 400 + ",3", "a,b", "3;4"]
)
def test_segment_rejects_non_numeric_clicks(tmp_path, segment_no_model, click):
    rc, err = segment_no_model("--click", click, "--out", tmp_path / "o")
    assert rc == 2
    _one_error_line(err, "malformed click|not a finite number")


def test_cli_usage_errors_are_one_line(capsys):
    from samref_jax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["segment", "x.png", "--click"])
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, "samref segment: error: argument --click")


# ------------------------------------------------------------------------------ trainer
def _tiny_config():
    from configs.tiny_cpu import get_config

    return get_config()


def test_train_rejects_a_bad_mode_before_creating_anything(tmp_path, capsys):
    from samref_jax.training.trainer import TrainConfigError, train
    from train.main import main

    work = tmp_path / "run"
    config = _tiny_config()
    config.mode = "fulll"
    with pytest.raises(TrainConfigError, match="config.mode must be one of sam, global, full"):
        train(config, work, progress=False)
    assert not work.exists()
    argv = ["--config", "configs/tiny_cpu.py", "--workdir", str(work), "--config.mode=bogus"]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, "config.mode must be one of")
    assert not work.exists()


def test_train_rejects_a_bad_remat_policy_before_creating_anything(tmp_path, capsys):
    from samref_jax.training.trainer import TrainConfigError, train
    from train.main import main

    work = tmp_path / "run"
    config = _tiny_config()
    config.train.remat_policy = "dots"
    with pytest.raises(TrainConfigError, match="train.remat_policy 'dots' is none of"):
        train(config, work, progress=False)
    assert not work.exists()
    argv = ["--config", "configs/tiny_cpu.py", "--workdir", str(work)]
    assert main([*argv, "--config.train.remat_policy=dots"]) == 2
    _one_error_line(capsys.readouterr().err, "remat_policy 'dots' is none of .*dots_saveable")
    assert not work.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.rounds=25", r"train.rounds \(25\) exceeds model.max_clicks \(24\)"),
        ("--config.eval.max_clicks=30", r"eval.max_clicks \(30\) exceeds model.max_clicks"),
    ],
)
def test_train_rejects_more_clicks_than_the_model_holds(tmp_path, capsys, override, message):
    """Click rounds or periodic-evaluation clicks beyond ``model.max_clicks`` are refused
    before anything is created (not at the first step, nor at the first evaluation)."""
    from train.main import main

    work = tmp_path / "run"
    argv = ["--config", "configs/tiny_cpu.py", "--workdir", str(work)]
    assert main([*argv, override]) == 2
    _one_error_line(capsys.readouterr().err, message)
    assert not work.exists()


def test_resume_of_a_run_written_before_remat_policy_existed(tmp_path):
    """A workdir whose config.json predates ``train.remat_policy`` resumes with the policy it
    ran under (recompute everything); any other policy is a change."""
    from samref_jax.training.trainer import resume_config_changes

    work = tmp_path / "run"
    work.mkdir()
    old = json.loads(_tiny_config().to_json_best_effort())
    del old["train"]["remat_policy"]
    (work / "config.json").write_text(json.dumps(old))
    assert resume_config_changes(work, _tiny_config()) == ([], [])
    other = _tiny_config()
    other.train.remat_policy = "dots_saveable"
    assert resume_config_changes(work, other) == (["train.remat_policy"], [])


def test_resume_refuses_a_config_that_changes_the_model_or_data(tmp_path, capsys):
    from samref_jax.training.trainer import TrainConfigError, resume_config_changes, train
    from train.main import main

    work = tmp_path / "run"
    work.mkdir()
    config = _tiny_config()
    written = config.to_json_best_effort(indent=2) + "\n"
    (work / "config.json").write_text(written)
    assert resume_config_changes(work, config) == ([], [])
    later = _tiny_config()
    later.train.num_steps += 100  # a longer run: fine
    later.eval.every_steps += 1
    assert resume_config_changes(work, later) == ([], ["eval.every_steps", "train.num_steps"])
    other = _tiny_config()
    other.model.max_clicks = 12
    other.data.per_device_batch_size += 1
    other.seed = 7
    refused, _ = resume_config_changes(work, other)
    assert refused == ["data.per_device_batch_size", "model.max_clicks", "seed"]
    with pytest.raises(TrainConfigError, match="model.max_clicks \\(24 -> 12\\).*allow_config"):
        train(other, work, progress=False)
    assert (work / "config.json").read_text() == written  # compared before rewriting

    argv = ["--config", "configs/tiny_cpu.py", "--workdir", str(work), "--config.seed=3"]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, "another config: seed \\(0 -> 3\\)")
    assert (work / "config.json").read_text() == written


def test_checkpoint_save_returns_before_writing_and_survives_donation(tmp_path):
    """``TrainCheckpointer.save`` writes in the background: the training step that follows
    donates (deletes) the saved arrays at once, and the checkpoint still holds their values."""
    import jax
    import jax.numpy as jnp

    from samref_jax.training.checkpointing import TrainCheckpointer

    state = {"w": jnp.arange(300_000.0), "b": jnp.ones(3)}
    expected = {k: np.asarray(v) for k, v in state.items()}
    ck = TrainCheckpointer(tmp_path / "checkpoints", 2)
    ck.save(1, state, {"step": 1})
    state = jax.jit(lambda s: {k: v + 1 for k, v in s.items()}, donate_argnums=0)(state)
    ck.save(2, state, {"step": 2})  # waits for step 1's write, then starts its own
    for v in jax.tree_util.tree_leaves(state):
        v.delete()  # as the next step's donation does
    assert ck.latest_step() == 2
    restored, data = ck.restore_latest({k: jnp.zeros_like(v) for k, v in expected.items()})
    assert data == {"step": 2}
    for k, v in expected.items():
        np.testing.assert_array_equal(np.asarray(restored[k]), v + 1)
    ck.close()


_KILLED_WRITE = """
import os, signal, sys
import jax.numpy as jnp
from samref_jax.training.checkpointing import TrainCheckpointer
ck = TrainCheckpointer(sys.argv[1], 3)
ck.save(1, {"w": jnp.full((1 << 24,), 1.0)}, {"step": 1})
ck.wait()
ck.save(2, {"w": jnp.full((1 << 24,), 2.0)}, {"step": 2})
os.kill(os.getpid(), signal.SIGKILL)  # while orbax writes step 2 in the background
"""


def test_kill_during_a_background_checkpoint_write_resumes_a_whole_checkpoint(tmp_path):
    """SIGKILL right after ``save`` returns, while orbax writes the 64 MiB state: a restore
    finds a whole checkpoint (step 1, or step 2 if its write got done), never a torn one."""
    import os
    import subprocess
    import sys

    import jax.numpy as jnp

    from samref_jax.training.checkpointing import TrainCheckpointer

    folder = tmp_path / "checkpoints"
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(folder)], timeout=300)
    assert r.returncode == -9, r.returncode
    ck = TrainCheckpointer(folder, 3)
    restored, data = ck.restore_latest({"w": jnp.zeros((1 << 24,))})
    step = data["step"]
    assert step in (1, 2) and ck.latest_step() == step, (step, sorted(os.listdir(folder)))
    np.testing.assert_array_equal(np.unique(np.asarray(restored["w"])), [float(step)])
    # The rerun goes on and writes the next step (over step 2's torn folder, if left).
    ck.save(step + 1, {"w": jnp.full((1 << 24,), 3.0)}, {"step": step + 1})
    assert ck.latest_step() == step + 1
    ck.close()


def test_damaged_latest_checkpoint_falls_back_with_one_warning(tmp_path, capfd):
    import jax.numpy as jnp

    from samref_jax.training.checkpointing import TrainCheckpointer, TrainCheckpointError

    folder = tmp_path / "checkpoints"
    state = {"w": jnp.arange(100.0), "b": jnp.ones(3)}
    ck = TrainCheckpointer(folder, 5)
    for step in (1, 2, 3):
        ck.save(step, {k: v * step for k, v in state.items()}, {"step": step})
    ck.close()
    for f in (folder / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"")  # the array data of step 3 is lost
    (folder / "9").mkdir()  # an empty step directory (a crash before anything was written)
    capfd.readouterr()
    ck = TrainCheckpointer(folder, 5)
    restored, data = ck.restore_latest(state)
    assert data == {"step": 2}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(100.0) * 2)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "asyncio" not in err, err
    warnings = [ln for ln in err.splitlines() if ln.strip()]
    assert len(warnings) == 1, err
    assert re.search("checkpoint step 3 .* is damaged .*resuming from step 2", warnings[0])
    assert not (folder / "9").exists() and not (folder / "3").exists()
    assert (tmp_path / "checkpoints_damaged" / "3").is_dir()  # kept for inspection
    ck.save(3, state, {"step": 3})  # the run goes on and saves step 3 again
    assert ck.latest_step() == 3
    ck.close()

    for step in (1, 2, 3):
        for f in (folder / str(step) / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"")
    ck = TrainCheckpointer(folder, 5)
    with pytest.raises(TrainCheckpointError, match="every checkpoint in .* is damaged"):
        ck.restore_latest(state)
    ck.close()


# ------------------------------------------------------------------------------ predictors
def test_sam_predictor_rejects_nan_points():
    from samref_jax.sam.build import load_sam
    from samref_jax.sam.predictor import SamPredictor

    predictor = SamPredictor(load_sam("tiny"))  # a bundled name, as from_checkpoint takes
    predictor.set_image(np.full((24, 32, 3), 120, np.uint8))
    for coords in ([[np.nan, 3.0]], [[4.0, np.inf]]):
        with pytest.raises(ValueError, match="point_coords must be finite"):
            predictor.predict(np.array(coords), np.array([1]))
    with pytest.raises(ValueError, match="box must hold finite numbers"):
        predictor.predict(box=np.array([0, 0, np.nan, 5]))


def test_load_sam_takes_the_bundled_names():
    from samref_jax.sam.build import load_sam

    for name in ("tiny", "tiny-sam"):
        assert load_sam(name).config.name == "tiny"


def test_tiny_sam_in_full_mode_warns_that_its_refiners_are_untrained(recwarn):
    import warnings

    from samref_jax.checkpoint import read_metadata
    from samref_jax.samref.io import resolve_checkpoint, untrained_refiners
    from samref_jax.samref.predictor import SamRefPredictor

    assert untrained_refiners(read_metadata(resolve_checkpoint("tiny-sam")))
    assert not untrained_refiners(read_metadata(resolve_checkpoint("tiny")))
    with pytest.warns(UserWarning, match="tiny-sam: the refiners .* never trained"):
        p = SamRefPredictor.from_checkpoint("tiny-sam", mode="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning in 'sam' mode, nor for the trained model
        q = SamRefPredictor.from_checkpoint("tiny-sam", mode="sam")
        SamRefPredictor.from_checkpoint("tiny", mode="full")
    with pytest.warns(UserWarning, match="never trained"):
        q.set_mode("global")
    assert p.untrained_refiners


# ------------------------------------------------------------------------------ fuzz
def _write_image(path: Path, kind: str, size: tuple[int, int], rng) -> None:
    """Writes one (often bad) image file of ``kind`` with ``size`` = (height, width)."""
    from PIL import Image

    h, w = size
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "garbage":
        path.write_bytes(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(rgb).save(path, format="PNG")
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "rotated":
        im = Image.fromarray(rgb)
        exif = im.getexif()
        exif[274] = 8
        im.save(path, format="JPEG", exif=exif)
    elif kind == "I;16":
        Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)).save(path, format="PNG")
    elif kind in ("F", "F-out"):
        scale = 1.0 if kind == "F" else 300.0
        Image.fromarray((rng.random((h, w)) * scale).astype(np.float32), mode="F").save(
            path, format="TIFF"
        )
    elif kind == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG")
    else:  # a Pillow mode: RGB, L, RGBA, P, 1, LA
        Image.fromarray(rgb).convert(kind).save(path, format="PNG")


_KINDS = ["RGB", "L", "RGBA", "P", "1", "LA", "I;16", "F", "F-out", "CMYK", "rotated"]
_BROKEN = ["garbage", "empty", "truncated"]
_SIZES = [(20, 30), (24, 24), (1, 500), (500, 1), (1, 1), (3, 2)]
_CLICKS = [
    "5,5,+", "3,4,-", " 2 , 1 , pos ", "0,0", "19.5,10.25,fg", "nan,1", "1,inf,+", "", ",",
    "1,2,3,4", "--click=-1,5", "1e9,2", "\uff15,5", "5,5,maybe", "x,y", "9" * 330 + ",1",
    "10000,5,+", "-0,-0,-", ".5,.5,1", "5,5,+,", "5;5", "\u00a05,5",
]  # fmt: skip


_GOOD_CLICKS = ["5,5,+", "3,4,-", " 2 , 1 , pos ", "0,0", "1,1,fg", ".5,.5,1", "-0,-0,-"]


def _check_outcome(rc: int, err: str, out_dir: Path | None = None) -> None:
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err, err
    if rc == 2:
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    if out_dir is not None:
        for path in out_dir.rglob("*.json"):
            json.loads(path.read_text(), parse_constant=lambda c, p=path: pytest.fail(f"{c}: {p}"))


@pytest.fixture(scope="module")
def shared_predictor():
    """One compiled tiny predictor for every fuzz case (mode switched per call)."""
    from samref_jax.samref.predictor import SamRefPredictor

    return SamRefPredictor.from_checkpoint("tiny", mode="full")


@pytest.mark.slow
def test_fuzz_cli_entry_points(tmp_path, monkeypatch, capsys, shared_predictor):
    import importlib

    from samref_jax import cli

    eval_cli = importlib.import_module("samref_jax.evaluation.evaluate")
    rng = np.random.default_rng(1234)

    def use_shared(name, mode="full", dtype="float32"):
        cli.check_checkpoint(name)
        shared_predictor.set_mode(mode)
        return shared_predictor

    monkeypatch.setattr(cli, "load_predictor", use_shared)
    monkeypatch.setattr(
        eval_cli, "_make_predictor", lambda f, c, mode, dtype="float32": use_shared(c, mode)
    )

    def call(main, argv):
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code
        return rc, capsys.readouterr().err

    # samref segment: image modes, sizes and broken files x click strings x output folders.
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    n_cases, outcomes = 0, []
    for i in range(200):
        kind = str(rng.choice(_KINDS * 3 + _BROKEN + ["missing", "folder"]))
        size = _SIZES[int(rng.integers(len(_SIZES)))] if rng.random() < 0.3 else (20, 30)
        path = tmp_path / f"img{i}.png"
        if kind == "folder":
            path.mkdir()
        elif kind != "missing":
            _write_image(path, kind, size, rng)
        pool = _GOOD_CLICKS if rng.random() < 0.6 else _CLICKS
        clicks = [str(rng.choice(pool)) for _ in range(int(rng.integers(0, 3)) or 1)]
        out = tmp_path / f"out{i}" if rng.random() < 0.85 else a_file / "sub"
        argv = ["segment", str(path), "--out", str(out), "--mode", str(rng.choice(cli.MODES))]
        for c in clicks:
            argv += [c] if c.startswith("--click=") else ["--click", c]
        rc, err = call(cli.main, argv)
        _check_outcome(rc, err)
        outcomes.append(("segment", rc))
        n_cases += 1

    # samref-eval: dataset folders with missing, extra, mis-sized and corrupt files.
    from PIL import Image

    for i in range(60):
        root = tmp_path / f"ds{i}" / "GrabCut"
        (root / "data_GT").mkdir(parents=True)
        (root / "boundary_GT").mkdir()
        for j in range(int(rng.integers(0, 4))):
            size = [(16, 20), (20, 16), (1, 1), (2, 40)][int(rng.integers(4))]
            kind = str(rng.choice(["RGB"] * 6 + ["L", "I;16", *_BROKEN, "rotated"]))
            _write_image(root / "data_GT" / f"s{j}.jpg", kind, size, rng)
            defect = rng.choice(["none"] * 5 + ["missing", "sized", "empty", "full", "band"])
            if defect == "missing":
                continue
            mh, mw = (size[0] + 3, size[1]) if defect == "sized" else size
            mask = np.zeros((mh, mw), np.uint8)
            mask[: mh // 2 + 1, : mw // 2 + 1] = 255
            if defect == "empty":
                mask[:] = 0
            elif defect == "full":
                mask[:] = 255
            elif defect == "band":
                mask[:] = 128
            Image.fromarray(mask).save(root / "boundary_GT" / f"s{j}.png")
        if rng.random() < 0.1:
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "boundary_GT" / "extra.png")
        out = tmp_path / f"eval{i}"
        argv = [
            "--checkpoint", str(rng.choice(["tiny", "tiny", "tiny", "nope"])),
            "--data-dir", str(root if rng.random() < 0.9 else tmp_path / "absent"),
            "--output", str(out),
            "--max-clicks", str(rng.choice([2, 2, 2, 0, 25])),
            "--mode", *[["sam"], ["full"], ["sam", "full"]][int(rng.integers(3))],
            "--no-progress", "--overlays", "1",
        ]  # fmt: skip
        if rng.random() < 0.5:
            argv.append("--skip-bad")
        if rng.random() < 0.3:
            argv += ["--limit", str(rng.choice([-1, 0, 1, 2]))]
        if rng.random() < 0.3:
            argv.append("--no-prefetch")
        rc, err = call(eval_cli.main, argv)
        _check_outcome(rc, err, out)
        outcomes.append(("eval", rc))
        if rc == 0 and rng.random() < 0.3:  # resume the same run: nothing left to do
            rc, err = call(eval_cli.main, argv)
            _check_outcome(rc, err, out)
        n_cases += 1
    assert n_cases == 260
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    for key in (("segment", 0), ("segment", 2), ("eval", 0), ("eval", 2)):
        assert counts.get(key, 0) >= 5, counts  # both outcomes well exercised


def test_resume_accepts_keys_added_since_the_run_started(tmp_path):
    """A run whose config.json predates the cached-embedding keys resumes with them at the values
    that reproduce it; turning the cache on is still a change."""
    from samref_jax.training.trainer import resume_config_changes

    work = tmp_path / "run"
    work.mkdir()
    config = _tiny_config()
    stored = json.loads(config.to_json_best_effort())
    for k in ("use_cached_embeddings", "cached_views", "cache_dtype", "cache_dir"):
        stored["data"].pop(k, None)
    stored["train"].pop("init_subtrees", None)
    (work / "config.json").write_text(json.dumps(stored))
    assert resume_config_changes(work, config) == ([], [])
    cached = _tiny_config()
    cached.data.use_cached_embeddings = True
    assert resume_config_changes(work, cached)[0] == ["data.use_cached_embeddings"]


def test_exit_alone_on_error_with_several_processes(monkeypatch, capsys):
    """With several processes an unexpected error ends the process at once (traceback, status
    1, no wait at JAX's shutdown barrier); an error every process meets alike propagates (one
    line and status 2 from the entry point); one process: everything propagates."""
    import jax

    from samref_jax.training import distributed
    from samref_jax.training.trainer import TrainConfigError

    class Exited(Exception):
        pass

    def fake_exit(status):
        raise Exited(status)

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    with pytest.raises(ValueError), distributed.exit_alone_on_error():
        raise ValueError("one process: propagates")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(Exited) as e, distributed.exit_alone_on_error(alike=(TrainConfigError,)):
        raise OSError("a disk error on host 1")
    assert e.value.args == (1,)
    err = capsys.readouterr().err
    assert "process 1 failed:" in err and "OSError: a disk error on host 1" in err
    with (
        pytest.raises(TrainConfigError),
        distributed.exit_alone_on_error(alike=(TrainConfigError,)),
    ):
        raise TrainConfigError("refused on every process")
