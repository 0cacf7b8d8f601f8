"""NoC metrics, the evaluator loop with test predictors, outputs, resume, compare and the CLI."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from samref_jax.data import read_folder_dataset
from samref_jax.evaluation import compare, evaluate, iou, load_records, miou_curve, noc, nof
from samref_jax.evaluation.evaluate import main

# -- test predictors -----------------------------------------------------------------------------


def _key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


class OraclePredictor:
    """Returns the ground truth (optionally with the ignore band added) whatever the clicks."""

    def __init__(self, gts: dict, with_band: bool = False) -> None:
        self.gts, self.with_band = gts, with_band
        self.embeds = 0

    def set_image(self, image):
        self.embeds += 1
        self.key = _key(image)

    def reset(self):
        pass

    def click(self, x, y, positive=True):
        gt = self.gts[self.key]
        return SimpleNamespace(mask=(gt != 0) if self.with_band else (gt == 1))


class EmptyPredictor:
    def set_image(self, image):
        self.shape = image.shape[:2]

    def reset(self):
        pass

    def click(self, x, y, positive=True):
        return {"mask": np.zeros(self.shape, bool)}


class DiskPredictor:
    """A tiny click-driven 'model': disks around positive clicks minus disks around negatives."""

    def __init__(self, radius: int = 40, fail_after: int | None = None) -> None:
        self.radius, self.fail_after = radius, fail_after
        self.images = 0
        self.modes: list[str] = []

    def set_mode(self, mode):
        self.modes.append(mode)

    def set_image(self, image):
        if self.fail_after is not None and self.images >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.images += 1
        self.shape = image.shape[:2]
        self.reset()

    def reset(self):
        self.mask = np.zeros(self.shape, bool)

    def click(self, x, y, positive=True):
        r = self.radius
        y0, x0 = max(y - r, 0), max(x - r, 0)
        yy, xx = np.ogrid[y0 : y + r + 1, x0 : x + r + 1]
        disk = (yy - y) ** 2 + (xx - x) ** 2 <= r**2
        window = self.mask[y0 : y + r + 1, x0 : x + r + 1]
        window[disk[: window.shape[0], : window.shape[1]]] = positive
        return SimpleNamespace(mask=self.mask.copy(), logits=None)


class PrefetchDiskPredictor(DiskPredictor):
    """DiskPredictor with the optional `prepare_image` (the evaluator then embeds ahead)."""

    def __init__(self, radius: int = 40, fail_after: int | None = None) -> None:
        super().__init__(radius, fail_after)
        self.prepared = 0

    def prepare_image(self, image):
        if self.fail_after is not None and self.prepared >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.prepared += 1
        return ("prepared", image)

    def set_image(self, image):  # an image, or what prepare_image returned
        if not isinstance(image, tuple):
            image = self.prepare_image(image)
        self.images += 1
        self.shape = image[1].shape[:2]
        self.reset()


def _oracle_for(samples) -> OraclePredictor:
    gts = {}
    for s in samples:
        gts[_key(s["image"])] = s["gt"]
    return OraclePredictor(gts)


def _synthetic(n: int = 4) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        h, w = 40 + 3 * i, 50
        gt = np.zeros((h, w), np.int8)
        gt[5 + i : 30, 10 : 35 + i] = 1
        gt[5 + i, 10 : 35 + i] = -1
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append({"image": image, "gt": gt, "id": f"s{i}".encode()})  # bytes ids, like TFDS
    return out


@pytest.fixture(scope="module")
def grabcut5(grabcut_dir):
    ds = read_folder_dataset("GrabCut", grabcut_dir)
    # Small images first (fast clicks); include masks with and without the 128 band.
    idx = [ds.ids.index(s) for s in ("106024", "124080", "153077", "189080", "book")]
    return [ds[i] for i in idx]


# -- metrics -------------------------------------------------------------------------------------


def test_iou_excludes_ignore():
    gt = np.array([[1, 1, 0, 0]], bool)
    pred = np.array([[1, 0, 1, 0]], bool)
    assert iou(pred, gt) == pytest.approx(1 / 3)
    assert iou(pred, gt, ignore=np.array([[0, 0, 1, 0]], bool)) == pytest.approx(1 / 2)
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_noc_nof_miou():
    curves = [[0.5, 0.86, 0.91, 0.96], [0.95, 0.95, 0.95, 0.95], [0.1, 0.2, 0.3, 0.9]]
    assert noc(curves, 0.85, 4) == pytest.approx((2 + 1 + 4) / 3)
    assert noc(curves, 0.90, 4) == pytest.approx((3 + 1 + 4) / 3)
    # NoF counts NoC == max_clicks, including a sample first reaching t on the last click (RITM).
    assert nof(curves, 0.90, 4) == 1 and nof(curves, 0.95, 4) == 2 and nof(curves, 0.99, 4) == 3
    np.testing.assert_allclose(miou_curve(curves, 4), np.mean(curves, axis=0))
    # Early-stopped curves are extended with their last value.
    np.testing.assert_allclose(miou_curve([[0.5, 0.9]], 4), [0.5, 0.9, 0.9, 0.9])


# -- evaluator -----------------------------------------------------------------------------------


def test_oracle_gives_noc_1_and_the_band_is_ignored(grabcut5):
    samples = _synthetic() + grabcut5
    assert any((s["gt"] == -1).any() for s in grabcut5)
    m = evaluate(_oracle_for(samples), samples, max_clicks=20, progress=False)
    assert m["num_samples"] == len(samples)
    for t in (85, 90, 95):
        assert m[f"NoC@{t}"] == 1.0 and m[f"NoF@{t}"] == 0
    assert m["mIoU@k"] == [1.0] * 20 and m["5-mIoU"] == 1.0
    # Predicting the band as object changes nothing: it is ignored in IoU.
    with_band = _oracle_for(samples)
    with_band.with_band = True
    m2 = evaluate(with_band, samples, max_clicks=3, progress=False)
    assert m2["NoC@95"] == 1.0 and m2["mIoU@k"] == [1.0] * 3
    # ... whereas scoring it would not (sanity check of the test itself).
    s = next(s for s in grabcut5 if (s["gt"] == -1).any())
    assert iou(s["gt"] != 0, s["gt"] == 1) < 1.0


def test_empty_predictor_fails_everywhere(grabcut5):
    samples = _synthetic(2) + grabcut5[:2]
    m = evaluate(EmptyPredictor(), samples, max_clicks=20, progress=False)
    for t in (85, 90, 95):
        assert m[f"NoC@{t}"] == 20.0 and m[f"NoF@{t}"] == len(samples)
    assert m["mIoU@k"] == [0.0] * 20


@pytest.mark.slow
def test_end_to_end_outputs_and_resume(grabcut5, tmp_path):
    out = tmp_path / "run"
    meta = {"dataset": "GrabCut", "mode": "full", "label": "disk"}
    # A crash after 2 samples: 2 finished lines survive.
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(DiskPredictor(fail_after=2), grabcut5, 20, out, metadata=meta, progress=False)
    assert len(load_records(out / "samples.jsonl")) == 2
    # A torn last line (killed mid-write) is dropped on resume.
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"id": "torn", "ious": [0.')
    resumed = DiskPredictor()
    m = evaluate(resumed, grabcut5, 20, out, metadata=meta, num_overlays=3, progress=False)
    assert resumed.images == 3  # only the unfinished samples ran
    fresh = evaluate(DiskPredictor(), grabcut5, 20, tmp_path / "fresh", metadata=meta)
    for key in ("NoC@85", "NoC@90", "NoC@95", "NoF@90", "mIoU@k", "5-mIoU", "num_samples"):
        assert m[key] == fresh[key], key
    assert m["num_samples"] == 5 and m["complete"]

    # With prefetch the crash surfaces in the background embedding of sample 3, raised when
    # the loop reaches it: the 2 samples before are written, and the run resumes from there.
    pre = tmp_path / "prefetch"
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(PrefetchDiskPredictor(fail_after=2), grabcut5, 20, pre, progress=False)
    assert len(load_records(pre / "samples.jsonl")) == 2
    again = PrefetchDiskPredictor()
    m_pre = evaluate(again, grabcut5, 20, pre, metadata=meta, progress=False)
    assert again.prepared == again.images == 3 and m_pre["metadata"]["prefetch"]
    assert m_pre["mIoU@k"] == fresh["mIoU@k"] and not fresh["metadata"]["prefetch"]

    # Every output exists and has the promised content.
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("NoC@85", "NoC@90", "NoC@95", "NoF@85", "NoF@90", "NoF@95", "5-mIoU"):
        assert key in on_disk
    assert len(on_disk["mIoU@k"]) == 20
    assert set(on_disk["seconds_per_click"]) == {"mean", "p50", "p95"}
    assert on_disk["seconds_per_click"]["mean"] > 0
    assert on_disk["seconds_per_image_embedding"] is not None
    assert on_disk["metadata"]["dataset"] == "GrabCut" and on_disk["metadata"]["label"] == "disk"
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [s["id"] for s in grabcut5]
    for r in lines:
        assert len(r["ious"]) == len(r["clicks"]) == len(r["click_seconds"]) == 20
        assert r["clicks"][0][2] == 1  # the first click is always positive
    assert "| disk | GrabCut |" in (out / "metrics.md").read_text()
    assert (out / "miou_curve.png").stat().st_size > 1000
    overlays = sorted((out / "overlays").glob("worst_*.png"))
    assert len(overlays) == 3
    assert len(list((out / "masks").glob("*.png"))) == 5
    # Rerunning a finished run evaluates nothing and rewrites the same metrics.
    again = DiskPredictor()
    m3 = evaluate(again, grabcut5, 20, out, metadata=meta, progress=False)
    assert again.images == 0 and m3["NoC@90"] == m["NoC@90"]
    with pytest.raises(ValueError, match="max_clicks"):
        evaluate(DiskPredictor(), grabcut5, 10, out, progress=False)


def test_limit_early_stop_and_shared_embedding_modes(tmp_path):
    samples = _synthetic(3)
    m = evaluate(DiskPredictor(25), samples, 20, limit=2, stop_iou=0.5, progress=False)
    assert m["num_samples"] == 2 and len(m["mIoU@k"]) == 20
    p = DiskPredictor(25)
    res = evaluate(p, samples, 5, tmp_path, modes=["sam", "full"], metadata={"dataset": "toy"})
    assert p.images == 3  # one embedding per image, shared by both modes
    assert p.modes == ["sam", "full"] * 3
    for mode in ("sam", "full"):
        assert res[mode]["num_samples"] == 3
        assert (
            json.loads((tmp_path / mode / "metrics.json").read_text())["metadata"]["mode"] == mode
        )
    with pytest.raises(TypeError, match="set_mode"):
        evaluate(EmptyPredictor(), samples, 2, modes=["sam", "full"])


@pytest.mark.slow
def test_concurrent_modes_and_prefetch_give_the_sequential_results(grabcut5, tmp_path):
    # The bundled tiny SAM-REF: modes run in their own forks and threads after one shared
    # embedding, and the next image is embedded in the background while the current one is
    # clicked, with exactly the clicks and IoUs of doing everything one after the other.
    from samref_jax.samref.predictor import PreparedImage, SamRefPredictor

    p = SamRefPredictor.from_checkpoint("tiny")
    prepared, given = [], []
    prepare, set_image = p.prepare_image, p.set_image
    p.prepare_image = lambda image: (prepared.append(1), prepare(image))[1]
    p.set_image = lambda image: (given.append(type(image)), set_image(image))[1]
    runs = {}
    for name, together, ahead in (("seq", False, False), ("par", True, False), ("pre", True, True)):
        res = evaluate(
            p, grabcut5, 4, tmp_path / name, limit=3, modes=["sam", "full"],
            concurrent_modes=together, prefetch=ahead, progress=False,
        )  # fmt: skip
        for r in res.values():
            assert r["metadata"]["concurrent_modes"] is together
            assert r["metadata"]["prefetch"] is ahead
            assert (r["timing"]["embedding_wait_total_s"] is not None) is ahead
        runs[name] = {m: load_records(tmp_path / name / m / "samples.jsonl") for m in res}
    assert len(prepared) == 9  # one embedding per image and run, shared by both modes
    # Prefetch: the first image is set directly, the next two arrive prepared in the background.
    assert given == [np.ndarray] * 7 + [PreparedImage] * 2
    assert p.mode == "full" and not p.clicks  # the modes ran on forks
    for mode in ("sam", "full"):
        seq = runs["seq"][mode]
        assert len(seq) == 3
        for name in ("par", "pre"):
            other = runs[name][mode]
            assert seq.keys() == other.keys()
            for sid in seq:
                assert other[sid]["ious"] == seq[sid]["ious"]
                assert other[sid]["clicks"] == seq[sid]["clicks"]
                assert other[sid]["concurrent_modes"] and "concurrent_modes" not in seq[sid]
                assert ("embedding_wait_s" in other[sid]) is (name == "pre")


def test_compare_merges_runs(tmp_path):
    samples = _synthetic(3)
    paths, labels = [], []
    for label, radius in (("sam", 10), ("full", 30)):
        for ds in ("GrabCut", "Berkeley"):
            out = tmp_path / label / ds
            evaluate(
                DiskPredictor(radius), samples, 6, out, metadata={"dataset": ds}, progress=False
            )
            paths.append(out / "metrics.json")
            labels.append(label)
    text = compare(paths, labels, tmp_path / "cmp")
    lines = text.splitlines()
    assert lines[0].startswith("| run | GrabCut NoC@85 |") and "Berkeley NoC@90" in lines[0]
    assert lines[2].startswith("| sam |") and lines[3].startswith("| full |")
    assert (tmp_path / "cmp" / "comparison.md").read_text() == text
    assert (tmp_path / "cmp" / "comparison_miou.png").stat().st_size > 1000


def test_cli_evaluate_and_compare(grabcut_dir, tmp_path, monkeypatch, capsys):
    created = []

    class FakeSamRefPredictor(PrefetchDiskPredictor):
        @classmethod
        def from_checkpoint(cls, path, mode="full", dtype=None):
            created.append((path, mode))
            return cls(30)

    fake = types.ModuleType("samref_jax.samref.predictor")
    fake.SamRefPredictor = FakeSamRefPredictor
    monkeypatch.setitem(sys.modules, "samref_jax.samref.predictor", fake)
    out = tmp_path / "eval"
    argv = [
        "--checkpoint",
        "tiny",  # checked before loading: it must exist (the fake predictor stands in for it)
        "--dataset",
        "grabcut",
        "--data-dir",
        str(grabcut_dir.parent),
        "--mode",
        "sam",
        "--max-clicks",
        "3",
        "--output",
        str(out),
        "--limit",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert created == [("tiny", "sam")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 2 and metrics["metadata"]["dataset"] == "GrabCut"
    assert metrics["metadata"]["mode"] == "sam" and metrics["metadata"]["prefetch"]
    assert main([*argv[:-5], "--output", str(tmp_path / "seq"), "--no-prefetch", *argv[-3:]]) == 0
    assert not json.loads((tmp_path / "seq" / "metrics.json").read_text())["metadata"]["prefetch"]
    assert "| sam | GrabCut |" in capsys.readouterr().out
    assert (
        main(
            [
                "compare",
                str(out),
                str(out / "metrics.json"),
                "--labels",
                "a",
                "b",
                "--output",
                str(tmp_path / "cmp.md"),
            ]
        )
        == 0
    )
    assert (tmp_path / "cmp.md").exists() and (tmp_path / "cmp.png").exists()
