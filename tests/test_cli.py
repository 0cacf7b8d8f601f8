"""``samref`` command line (``samref_jax/cli.py``) and the overlay drawing (``samref_jax/viz.py``).

The end-to-end run segments a real GrabCut image with a small random-weight SAM-REF model;
the error cases check the one-line message and exit status 2 (no traceback, no model load).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samref_jax import cli, viz

REPO = Path(__file__).resolve().parents[1]


def _run(args, env_extra=None, timeout=600):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env_extra or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "samref_jax.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def grabcut_image(grabcut_dir) -> Path:
    return grabcut_dir / "data_GT" / "banana1.bmp"


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("120,80,+", (120.0, 80.0, True)),
        ("120,80,-", (120.0, 80.0, False)),
        ("12.5, 7 ,neg", (12.5, 7.0, False)),
        ("3,4", (3.0, 4.0, True)),
        ("3,4,pos", (3.0, 4.0, True)),
        ("3,4,0", (3.0, 4.0, False)),
    ],
)
def test_parse_click(spec, expected):
    assert cli.parse_click(spec) == expected


@pytest.mark.parametrize("spec", ["", "1", "1,2,3,4", "a,b,+", "1,2,x", "1;2;+", "1,,+"])
def test_parse_click_rejects(spec):
    with pytest.raises(cli.CliError, match="malformed click"):
        cli.parse_click(spec)


ALL_COMMANDS = [
    "convert",
    "segment",
    "amg",
    "eval",
    "compare",
    "prepare-coco",
    "train",
    "cache-embeddings",
    "launch-local",
    "demo",
    "export",
]


def test_help_lists_every_command(capsys):
    assert list(cli.COMMANDS) == ALL_COMMANDS
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ALL_COMMANDS:
        assert f"\n    {name} " in out or f"\n    {name}\n" in out, (name, out)


@pytest.mark.parametrize("name", [*ALL_COMMANDS, "demo-app"])
def test_every_command_help(name, capsys):
    # Each command's own --help (a forwarded command's parser included): exit 0, a description
    # and an example starting with `samref NAME`.
    try:
        rc = cli.main([name, "--help"])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None)
    out = capsys.readouterr().out
    name = cli._lookup(name).name  # an alias shows the command's name
    assert out.startswith(f"usage: samref {name}"), out[:200]
    assert "\nexample" in out and f"  samref {name} " in out, out


def test_old_entry_points_are_doors_to_the_same_functions():
    import importlib

    import train.main as train_main
    from samref_jax.sam import convert

    # importlib: the packages export functions called `evaluate` that shadow these modules.
    eval_door = importlib.import_module("samref_jax.evaluate")
    evaluate = importlib.import_module("samref_jax.evaluation.evaluate")

    assert eval_door.main is evaluate.main
    door = (REPO / "convert_weights.py").read_text()
    assert "from samref_jax.sam.convert import main" in door and callable(convert.main)
    assert callable(train_main.main)
    entry = (REPO / "setup.cfg").read_text()
    for line in (
        "samref = samref_jax.cli:main",
        "samref-eval = samref_jax.evaluation.evaluate:main",
        "samref-convert = samref_jax.sam.convert:main",
        "samref-train = train.main:main",
    ):
        assert line in entry


def test_forwarded_usage_errors_name_the_samref_command(tmp_path, capsys):
    assert cli.main(["train", "--no_such_flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "samref train: error: Unknown command line flag 'no_such_flag' (see --help)"
    assert cli.main(["compare", str(tmp_path / "none.json"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samref compare: error: ") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--output", str(tmp_path), "--max-clicks", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samref eval: error: argument --max-clicks") and "\n" not in err


@pytest.mark.slow
def test_eval_two_grabcut_images(grabcut_dir, tmp_path, capsys):
    # `samref eval` as a user runs it: the bundled model, two GrabCut images, both modes.
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", "tiny", "--dataset", "GrabCut", "--data-dir"]
    argv += [str(grabcut_dir.parent), "--mode", "sam", "full", "--max-clicks", "3"]
    argv += ["--limit", "2", "--overlays", "1", "--no-progress", "--output", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    import json

    for mode in ("sam", "full"):
        metrics = json.loads((out / mode / "metrics.json").read_text())
        assert metrics["num_samples"] == 2, metrics
        assert metrics["metadata"]["command"].startswith("samref eval --checkpoint tiny")
    assert (out / "comparison.md").is_file()
    assert cli.main(["compare", "--output", str(tmp_path / "cmp"), str(out / "sam")]) == 0


def test_registry_builds_subparsers():
    assert {"segment", "demo"} <= set(cli.COMMANDS)
    assert cli._lookup("demo-app") is cli.COMMANDS["demo"]  # the former name still works
    calls = []

    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        calls.append(args.n)
        return 0

    cli.register("unit-test-cmd", "a test command", configure, run)
    try:
        assert cli.main(["unit-test-cmd", "--n", "3"]) == 0
        assert calls == [3]
        args = cli.build_parser().parse_args(["segment", "x.png", "--click", "1,2", "--out", "o"])
        assert args.checkpoint == "tiny" and args.mode == "full"
    finally:
        del cli.COMMANDS["unit-test-cmd"]


# ------------------------------------------------------------------------------- errors
def _bad_image(tmp_path: Path) -> Path:
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8 definitely not a jpeg")
    return p


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_image", "image not found"),
        ("unreadable_image", "cannot read"),
        ("malformed_click", "malformed click '5;5'"),
        ("click_outside", "click 2 (640, 10) is outside the 640x480 image"),
        ("negative_click", "is outside the 640x480 image"),
        ("missing_checkpoint", "checkpoint not found"),
        ("no_clicks", "give at least one click"),
    ],
)
def test_segment_user_errors(case, message, grabcut_image, tmp_path):
    image, clicks, ckpt = str(grabcut_image), ["10,10,+"], str(tmp_path / "no_such_ckpt")
    if case == "missing_image":
        image = str(tmp_path / "nope.png")
    elif case == "unreadable_image":
        image = str(_bad_image(tmp_path))
    elif case == "malformed_click":
        clicks = ["5;5"]
    elif case == "click_outside":
        clicks = ["10,10,+", "640,10,-"]
    elif case == "negative_click":
        clicks = ["10,-1,+"]
    elif case == "no_clicks":
        clicks = []
    args = ["segment", image, "--checkpoint", ckpt, "--out", str(tmp_path / "out")]
    for c in clicks:
        args.append(f"--click={c}")
    r = _run(args, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("samref segment: error: "), r.stderr
    assert message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_missing_bundled_checkpoint_is_one_line(grabcut_image, tmp_path, monkeypatch, capsys):
    from samref_jax.samref import io

    monkeypatch.setattr(io, "_ASSETS", tmp_path / "no_assets")
    rc = cli.main(["segment", str(grabcut_image), "--click", "5,5,+", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samref segment: error: bundled checkpoint 'tiny' is missing"), err
    assert "\n" not in err


@pytest.mark.slow
def test_segment_grabcut(tiny_checkpoint, jax_cache_env, grabcut_image, tmp_path):
    out = tmp_path / "seg"
    r = _run(
        [
            "segment",
            str(grabcut_image),
            "--checkpoint",
            str(tiny_checkpoint),
            "--click",
            "300,250,+",
            "--click",
            "100,100,-",
            "--click",
            "450,200,+",
            "--mode",
            "full",
            "--out",
            str(out),
        ],
        env_extra=jax_cache_env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [str(out / "mask.png"), str(out / "overlay.png")]
    image = np.asarray(Image.open(grabcut_image).convert("RGB"))
    h, w = image.shape[:2]

    mask = Image.open(out / "mask.png")
    assert mask.mode == "L" and mask.size == (w, h)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}

    ov = Image.open(out / "overlay.png")
    assert ov.mode == "RGB" and ov.size == (w, h)
    ov = np.asarray(ov)
    assert not np.array_equal(ov, image)
    for colour in (viz.POSITIVE_COLOR, viz.NEGATIVE_COLOR, viz.WINDOW_COLOR):
        assert np.all(ov == colour, axis=-1).any(), f"{colour} not drawn"
    assert "PatchDiff window (" in r.stderr


@pytest.mark.slow
def test_readme_first_command(jax_cache_env, tmp_path):
    # The README's command 1, as written, after its install step: the bundled model on the
    # bundled example image (only the output folder moves to tmp).
    readme = (REPO / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if "&& samref segment " in ln]
    args = shlex.split(line.split("&& samref segment ", 1)[1])
    out = args.index("--out")
    args[out + 1] = str(tmp_path / "quickstart")
    r = _run(["segment", *args], env_extra=jax_cache_env)
    assert r.returncode == 0, r.stderr[-3000:]
    image = Image.open(REPO / args[0])
    for name in ("mask.png", "overlay.png"):
        assert Image.open(tmp_path / "quickstart" / name).size == image.size
    mask = np.asarray(Image.open(tmp_path / "quickstart" / "mask.png")) > 127
    # The overlay must be visibly right: the example's ground truth is bundled next to it.
    gt = np.asarray(Image.open((REPO / args[0]).with_name(Path(args[0]).stem + "_mask.png")))
    gt = gt > 127
    iou = (mask & gt).sum() / (mask | gt).sum()
    assert iou >= 0.8, f"README quick-start mask IoU {iou:.3f} against the example's mask"


# ---------------------------------------------------------------------------------- viz
def test_viz_mask_and_overlay():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:40, 20:50] = True

    m = viz.mask_image(mask)
    assert m.mode == "L" and m.size == (80, 60)
    np.testing.assert_array_equal(np.asarray(m) == 255, mask)

    ov = np.asarray(viz.overlay(image, mask, [(30, 20, True), (70, 50, False)], (5, 5, 60, 45)))
    assert ov.shape == image.shape
    # Untouched far from the mask, the markers and the window.
    np.testing.assert_array_equal(ov[55:, :3], image[55:, :3])
    assert np.all(ov[25, 35] != image[25, 35])  # tinted
    assert np.all(ov == viz.WINDOW_COLOR, axis=-1).any()
    assert np.all(ov == viz.POSITIVE_COLOR, axis=-1).any()
    assert np.all(ov == viz.NEGATIVE_COLOR, axis=-1).any()

    with pytest.raises(ValueError, match="does not match"):
        viz.overlay(image, mask[:10])
    strip = viz.side_by_side([Image.fromarray(image)] * 3, ["a", "b", "c"])
    assert strip.size == (3 * 80 + 2 * 4, 60)


# -------------------------------------------------------------------------------- dtype
@pytest.mark.slow
def test_dtype_bfloat16_segment_and_eval(grabcut_dir, tmp_path, capsys):
    # `--dtype bfloat16` as documented: segment one GrabCut image, evaluate two; the dtype is
    # in run.json and metrics.json, and a resume with float32 is refused in one line (exit 2).
    import json

    image = grabcut_dir / "data_GT" / "banana1.bmp"
    seg = ["segment", str(image), "--checkpoint", "tiny", "--dtype", "bfloat16"]
    seg += ["--click", "300,250,+", "--click", "100,100,-", "--out", str(tmp_path / "seg")]
    assert cli.main(seg) == 0, capsys.readouterr().err[-2000:]
    assert "mode full, bfloat16, mask covers" in capsys.readouterr().err
    mask = np.asarray(Image.open(tmp_path / "seg" / "mask.png"))
    assert mask.shape == np.asarray(Image.open(image)).shape[:2] and mask.any()

    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", "tiny", "--dataset", "GrabCut", "--data-dir"]
    argv += [str(grabcut_dir.parent), "--mode", "full", "--max-clicks", "2", "--limit", "2"]
    argv += ["--overlays", "0", "--no-progress", "--output", str(out)]
    assert cli.main([*argv, "--dtype", "bfloat16"]) == 0, capsys.readouterr().err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 2 and metrics["metadata"]["dtype"] == "bfloat16"
    assert json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert cli.main([*argv, "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samref eval: error: ") and "\n" not in err, err
    assert "holds another run (dtype: 'bfloat16' -> 'float32')" in err, err
    assert cli.main([*argv, "--dtype", "bfloat16"]) == 0  # the same run resumes (done)


def test_dtype_identity_of_earlier_runs():
    # run.json files written before the dtype was recorded were float32 runs.
    from samref_jax.evaluation.evaluator import _identity_diff

    old = {"method": "samref", "mode": "sam"}
    assert _identity_diff(old, {**old, "dtype": "float32"}) == []
    assert _identity_diff(old, {**old, "dtype": "bfloat16"}) == ["dtype"]
    assert _identity_diff({**old, "dtype": "bfloat16"}, old) == ["dtype"]


def test_dtype_needs_the_samref_model(tmp_path, capsys):
    argv = ["eval", "--method", "opencv-grabcut", "--dtype", "bfloat16", "--output", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "samref eval: error: --dtype bfloat16 needs the SAM-REF model (--checkpoint, no "
        "--predictor-factory)"
    ), err


def test_dtype_reaches_the_model():
    import jax.numpy as jnp

    from samref_jax.evaluation.evaluate import _make_predictor

    assert cli.load_predictor("tiny", "sam", "bfloat16").model.dtype == jnp.bfloat16
    assert _make_predictor(None, "tiny", "sam", "bfloat16").model.dtype == jnp.bfloat16
    assert cli.load_predictor("tiny", "sam").model.dtype == jnp.float32
    with pytest.raises(cli.LoadError, match="dtype must be one of float32, bfloat16"):
        cli.load_predictor("tiny", "sam", "float16")
