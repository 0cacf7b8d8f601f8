"""``samref amg``: the documented example run as written (bundled model, output moved to tmp),
folder input with RLEs in the JSON, and the one-line user errors (exit status 2)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from PIL import Image

from samref_jax import cli
from samref_jax.sam import amg


def _example_args() -> list[str]:
    """The arguments of the `samref amg` example in `samref amg --help`."""
    text = cli.COMMANDS["amg"].example
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines()).replace("\\\n", " ")
    args = shlex.split(text)
    assert args[:2] == ["samref", "amg"]
    return args[2:]


def _check_folder(folder, image_hw, rle=None):
    doc = json.loads((folder / "masks.json").read_text())
    assert (doc["height"], doc["width"]) == image_hw
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == [m["file"] for m in doc["masks"]]
    for rec in doc["masks"]:
        mask = np.asarray(Image.open(folder / rec["file"]))
        assert mask.shape == image_hw and set(np.unique(mask)) <= {0, 255}
        mask = mask > 127
        assert rec["area"] == int(mask.sum())
        x0, y0, x1, y1 = amg.masks_to_boxes(mask[None])[0].tolist()
        assert rec["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert set(rec) >= {"predicted_iou", "stability_score", "point_coords", "crop_box"}
        if rle == "uncompressed":
            np.testing.assert_array_equal(amg.rle_to_mask(rec["segmentation"]), mask)
        elif rle == "coco":
            assert rec["segmentation"] == amg.coco_encode_rle(mask)
        else:
            assert "segmentation" not in rec
    return doc


def test_amg_example_as_documented(tmp_path, capsys):
    args = _example_args()
    out = args.index("--out")
    args[out + 1] = str(tmp_path / "amg")
    image = args[args.index("--image") + 1]
    assert cli.main(["amg", *args]) == 0
    captured = capsys.readouterr()
    folder = tmp_path / "amg" / "blob_on_stripes"
    assert captured.out.splitlines() == [str(folder / "masks.json")]
    h, w = np.asarray(Image.open(image)).shape[:2]
    doc = _check_folder(folder, (h, w))
    assert len(doc["masks"]) >= 3, "the example should show some masks"
    assert "samref amg: " in captured.err


@pytest.mark.parametrize("rle", ["coco", "uncompressed"])
def test_amg_folder_with_rle(tiny_checkpoint, tmp_path, capsys, rle):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    for name, hw in [("a.png", (60, 90)), ("b.jpg", (100, 70))]:
        Image.fromarray((rng.rand(*hw, 3) * 255).astype(np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    args = ["amg", "--checkpoint", str(tiny_checkpoint), "--image", str(images)]
    args += ["--out", str(tmp_path / "out"), "--points-per-side", "4", "--rle", rle]
    args += ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [str(tmp_path / "out" / n / "masks.json") for n in ("a", "b")]
    for name, hw in [("a", (60, 90)), ("b", (100, 70))]:
        doc = _check_folder(tmp_path / "out" / name, hw, rle)
        assert len(doc["masks"]) == 48  # 16 points x 3 masks, nothing filtered


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "missing.png"], "image not found: missing.png"),
        (["--image", "EMPTY"], "no images in folder"),
        (["--image", "TEXT"], "cannot read"),
        (["--image", "IMG", "--points-per-side", "0"], "must be >= 1"),
        (["--image", "IMG", "--checkpoint", "no/such/dir"], "checkpoint not found"),
        (["--image", "IMG", "--out", "FILE"], "--out is not a folder"),
    ],
)
def test_amg_user_errors(extra, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "text.png").write_text("not a png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img.png")
    names = {"EMPTY": "empty", "TEXT": "text.png", "IMG": "img.png", "FILE": "file"}
    extra = [str(tmp_path / names[a]) if a in names else a for a in extra]
    if "--out" not in extra:
        extra += ["--out", str(tmp_path / "out")]
    try:
        rc = cli.main(["amg", *extra])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("samref amg: error: "), err
