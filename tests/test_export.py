"""`samref export`: jax.export programs that serve the model without samref_jax.

The bundled "tiny" model is exported once (through the command line); the standalone client
examples/serve_exported.py segments an image in a subprocess that cannot import samref_jax, and
its final logits in the frame equal SamRefPredictor's bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from samref_jax.cli import main
from samref_jax.export import ARTIFACTS, CLICK_OUTPUTS, STATE_FIELDS, check_export_directory
from samref_jax.samref.io import resolve_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "examples" / "serve_exported.py"
CLICKS = [(60.0, 45.0, True), (35.0, 25.0, False), (85.0, 65.0, True)]

# Runs a script with samref_jax unimportable, and checks at the end that it was never loaded.
_ISOLATED = """
import importlib.abc, runpy, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "samref_jax":
            raise ImportError("samref_jax is not available to the exported programs")
        return None

sys.meta_path.insert(0, _Block())
script, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "samref_jax")
assert not loaded, loaded
print("samref_jax never imported")
sys.exit(code)
"""


def _image() -> np.ndarray:
    """(90, 120, 3) uint8: a noisy yellow rectangle on blue."""
    rng = np.random.default_rng(0)
    img = np.zeros((90, 120, 3), np.int64)
    img[...] = (30, 60, 90)
    img[20:70, 30:90] = (200, 180, 40)
    return (img + rng.integers(0, 20, img.shape)).astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["export", "--checkpoint", "tiny", "--out", str(out)]) == 0
    return out


def test_export_writes_the_artifacts_and_manifest(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(ARTIFACTS)
    assert not any(p.name.startswith(".") for p in exported.parent.iterdir())  # no staging left
    m = json.loads((exported / "manifest.json").read_text())
    meta = json.loads((resolve_checkpoint("tiny") / "metadata.json").read_text())
    cfg = meta["samref_config"]
    k = int(cfg["refiners"]["patch_diff"].get("image_scale", 1))
    assert (m["frame_size"], m["image_scale"], m["mode"], m["dtype"]) == (128, k, "full", "float32")
    assert m["max_clicks"] == cfg["max_clicks"] and m["click_radius"] == cfg["click_radius"]
    assert m["first_prev_logit"] == cfg["first_prev_logit"]
    inputs = m["prepare"]["inputs"]
    assert [i["name"] for i in inputs] == ["frame", "valid_hw", "radius"] + ["detail"] * (k > 1)
    assert inputs[0]["shape"] == ["B", 128, 128, 3]
    if k > 1:
        assert inputs[3]["shape"] == ["B", 128 * k, 128 * k, 3]
    names = [i["name"] for i in m["click"]["inputs"]]
    context = [o["name"] for o in m["prepare"]["outputs"]]
    assert names == context + list(STATE_FIELDS) + ["xy", "label"]
    outs = [o["name"] for o in m["click"]["outputs"]]
    assert outs == list(CLICK_OUTPUTS) + [f"next_{n}" for n in STATE_FIELDS]
    assert m["click"]["outputs"][0] == {
        "name": "final_logits",
        "shape": ["B", 128, 128],
        "dtype": "float32",
    }
    with np.load(exported / "params.npz") as npz:
        assert sorted(npz.files) == sorted(a["name"] for a in m["params"]["arrays"])
    assert len(m["checkpoint"]["params_sha256"]) == 64
    for key in ("image", "frame", "valid_hw", "radius", "click", "postprocess"):
        assert m["recipe"][key]


@pytest.mark.slow  # a subprocess compiling both programs, and the predictor: ~80 s here
def test_served_export_matches_the_predictor(exported, tmp_path):
    from samref_jax.samref.predictor import SamRefPredictor

    image = _image()
    Image.fromarray(image).save(tmp_path / "image.png")
    clicks = [f"--click={x:g},{y:g},{'+' if pos else '-'}" for x, y, pos in CLICKS]
    cmd = [sys.executable, "-I", "-c", _ISOLATED, str(SERVE), str(exported),
           str(tmp_path / "image.png"), *clicks, "--out", str(tmp_path / "mask.png"),
           "--save-logits", str(tmp_path / "logits.npz")]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "samref_jax never imported" in run.stdout
    served = np.load(tmp_path / "logits.npz")

    predictor = SamRefPredictor.from_checkpoint("tiny", mode="full")
    predictor.set_image(image)
    for i, (x, y, positive) in enumerate(CLICKS):
        result = predictor.click(x, y, positive=positive)
        # The predictor's state after the click holds its final logits in the frame.
        library = np.asarray(predictor._history[-1].state.prev_logits)[0]
        assert served["frame_logits"][i].dtype == library.dtype == np.float32
        assert np.array_equal(served["frame_logits"][i], library), f"click {i + 1}"
    # The client's NumPy resize to the image's size: the library's up to float rounding.
    np.testing.assert_allclose(served["logits"], result.logits, rtol=0, atol=1e-4)
    mask = np.asarray(Image.open(tmp_path / "mask.png")) > 0
    assert mask.shape == image.shape[:2] and 0.1 < mask.mean() < 0.9
    assert (mask != result.mask).mean() < 1e-3


def test_symbolic_batch(exported):
    """One program for any batch: two images in one call give each image's own context."""
    m = json.loads((exported / "manifest.json").read_text())
    prepare = jax.export.deserialize(bytearray((exported / "prepare.jax").read_bytes()))
    with np.load(exported / "params.npz") as npz:
        params = [npz[a["name"]] for a in m["params"]["arrays"]]
    rng = np.random.default_rng(1)
    frames = rng.normal(size=(2, 128, 128, 3)).astype(np.float32)
    hw = np.array([[128, 100], [90, 128]], np.int32)
    radius = np.array([5.0, 7.0], np.float32)
    args = [frames, hw, radius]
    if m["image_scale"] > 1:
        k = m["image_scale"]
        args.append(rng.normal(size=(2, 128 * k, 128 * k, 3)).astype(np.float32))
    both = prepare.call(*params, *args)
    one = prepare.call(*params, *[a[1:] for a in args])
    for spec, a, b in zip(m["prepare"]["outputs"], both, one, strict=True):
        expect = 2 if spec["shape"][0] == "B" else 1
        assert a.shape[0] == expect, spec
        np.testing.assert_allclose(a[-1], b[-1], rtol=1e-5, atol=1e-5, err_msg=spec["name"])


def test_export_refuses_a_non_empty_out(tmp_path, capsys, exported):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(["export", "--checkpoint", "tiny", "--out", str(busy)]) == 2
    assert main(["export", "--checkpoint", "tiny", "--out", str(busy), "--force"]) == 2
    assert main(["export", "--checkpoint", "tiny", "--out", str(exported)]) == 2
    assert main(["export", "--out", str(tmp_path / "new"), "--platforms", "cpu,gpu9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4, err
    assert "not empty" in err[0] and "--force" in err[0]
    assert "even with --force" in err[1]
    assert "already holds an export" in err[2] and "--force" in err[2]
    assert "--platforms" in err[3]
    assert (busy / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "new").exists()
    assert check_export_directory(exported, force=True) == exported.absolute()
