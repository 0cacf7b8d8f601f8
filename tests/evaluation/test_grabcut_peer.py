"""The classical OpenCV GrabCut peer (``samref-eval --method opencv-grabcut``)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2")

from samref_jax.evaluation import grabcut  # noqa: E402
from samref_jax.evaluation import metrics as M  # noqa: E402
from samref_jax.evaluation.evaluate import load_samples, main  # noqa: E402
from samref_jax.interaction.clicker import next_click  # noqa: E402


def _disk_count(radius: int) -> int:
    r = np.arange(-radius, radius + 1)
    return int(((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius).sum())


def test_seed_mask_disks():
    """Clicks become disks of the radius: positive GC_FGD, negative GC_BGD, later ones on top,
    clipped at the border; the rest stays as it was."""
    mask = np.full((30, 40), grabcut.GC_PR_BGD, dtype=np.uint8)
    grabcut.seed_mask(mask, [(10, 12, True)], radius=3)
    assert (mask == grabcut.GC_FGD).sum() == _disk_count(3) == 29
    assert mask[10, 15] == grabcut.GC_FGD and mask[10, 16] == grabcut.GC_PR_BGD
    assert mask[12, 14] == grabcut.GC_FGD  # offset (2, 2): distance sqrt(8) <= 3
    assert mask[13, 14] == grabcut.GC_PR_BGD  # offset (3, 2): distance sqrt(13) > 3
    # A negative click overlapping the first one wins where they overlap (click order).
    grabcut.seed_mask(mask, [(10, 12, True), (10, 16, False)], radius=3)
    assert mask[10, 14] == grabcut.GC_BGD and mask[10, 12] == grabcut.GC_FGD
    assert (mask == grabcut.GC_BGD).sum() == _disk_count(3)
    # A corner click is clipped to the image.
    corner = grabcut.seed_mask(np.full((8, 8), 2, np.uint8), [(0, 0, False)], radius=2)
    assert (corner == grabcut.GC_BGD).sum() == 6
    assert set(np.unique(corner)) == {grabcut.GC_BGD, grabcut.GC_PR_BGD}


def test_predictor_synthetic_and_deterministic():
    """One positive click inside a coloured square finds the square; reruns are identical."""
    rng = np.random.default_rng(0)
    image = np.zeros((64, 80, 3), dtype=np.uint8)
    image[..., 2] = 180
    image[16:48, 20:60] = (200, 40, 30)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    gt = np.zeros((64, 80), bool)
    gt[16:48, 20:60] = True
    p = grabcut.GrabCutPredictor(radius=5, iterations=3)
    p.set_image(image)
    first = p.click(40, 32, positive=True)
    assert M.iou(first, gt) > 0.95
    second = p.click(5, 5, positive=False)
    assert p.initialised and len(p.clicks) == 2
    p.reset()
    assert not p.initialised and p.clicks == []
    assert np.array_equal(p.click(40, 32, positive=True), first)
    assert np.array_equal(p.click(5, 5, positive=False), second)
    # A negative first click (no foreground seed) predicts nothing and keeps GrabCut idle.
    p.reset()
    assert not p.click(5, 5, positive=False).any() and not p.initialised
    with pytest.raises(ValueError, match="radius"):
        grabcut.GrabCutPredictor(radius=0)
    # The other carry rules (label mask only; nothing) segment the square as well.
    for carry in ("mask", "none"):
        q = grabcut.GrabCutPredictor(carry=carry)
        q.set_image(image)
        q.click(40, 32, positive=True)
        assert M.iou(q.click(5, 5, positive=False), gt) > 0.95, carry
    with pytest.raises(ValueError, match="carry"):
        grabcut.GrabCutPredictor(carry="all")


@pytest.mark.slow
def test_grabcut_cli_on_real_images(grabcut_dir, tmp_path):
    """Two real GrabCut images, 5 clicks, through the CLI entry point: the outputs of a model
    run, finite metrics, a row 'opencv-grabcut', and clicks that are the project's simulator's
    on the peer's own predictions."""
    out = tmp_path / "gc"
    argv = ["--method", "opencv-grabcut", "--data-dir", str(grabcut_dir), "--max-clicks", "5"]
    argv += ["--limit", "2", "--output", str(out), "--no-progress", "--overlays", "1"]
    assert main(argv) == 0
    for name in ("samples.jsonl", "metrics.json", "metrics.md", "miou_curve.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "masks").glob("*.png"))) == 2
    assert len(list((out / "overlays").glob("worst_*.png"))) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["max_clicks"] == 5
    assert metrics["metadata"]["label"] == "opencv-grabcut"
    assert metrics["metadata"]["method"] == "opencv-grabcut"
    assert metrics["metadata"]["grabcut_radius"] == 5
    assert metrics["metadata"]["checkpoint"] is None
    for key in ("NoC@85", "NoC@90", "NoC@95", "5-mIoU"):
        assert math.isfinite(metrics[key]), key
    assert all(math.isfinite(v) for v in metrics["mIoU@k"])
    assert metrics["seconds_per_click"]["mean"] > 0

    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert any(r["ious"][-1] > r["ious"][0] + 0.05 for r in records)

    samples = load_samples("GrabCut", grabcut_dir)
    peer = grabcut.GrabCutPredictor()
    for rec in records:
        sample = samples[rec["index"]]
        assert sample["id"] == rec["id"]
        gt = np.asarray(sample["gt"])
        obj, ignore = gt == 1, gt == -1
        peer.set_image(np.asarray(sample["image"]))
        peer.reset()
        pred = np.zeros(gt.shape, bool)
        clicked = np.zeros(gt.shape, bool)
        assert len(rec["clicks"]) == len(rec["ious"]) == 5
        for (y, x, positive), recorded_iou in zip(rec["clicks"], rec["ious"], strict=True):
            assert next_click(obj, pred, clicked, ignore) == (y, x, bool(positive))
            clicked[y, x] = True
            pred = peer.click(x, y, positive=bool(positive))
            assert M.iou(pred, obj, ignore) == recorded_iou
        saved = np.asarray(Image.open(next((out / "masks").glob(f"{rec['index']:05d}_*.png"))))
        assert np.array_equal(saved.astype(bool), pred)

    table = main(["compare", "--output", str(tmp_path / "cmp"), str(out / "metrics.json")])
    assert table == 0
    assert "| opencv-grabcut |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_missing_opencv_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    argv = ["--method", "opencv-grabcut", "--data-dir", str(tmp_path), "--output", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install samref-jax[opencv]" in err
