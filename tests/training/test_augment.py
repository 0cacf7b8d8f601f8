"""The pipeline's augmentations: copy-paste (``pipeline.copy_paste``) and the first click.

Sources are plain lists of ``{"image", "gt", "id"}`` samples (what a prepared record holds), so
everything here runs in a second or two without preparing a dataset.
"""

from __future__ import annotations

import hashlib
import pickle

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from samref_jax.training import pipeline
from samref_jax.training.pipeline import _Augment, _Subset, augment, first_click
from samref_jax.training.testing import synthetic_batch, tiny_test_config

RED = np.array([220, 30, 40], np.uint8)  # the target object's colour (nowhere else)
FRAME = 64


def _textured_source(n: int = 6) -> list[dict]:
    """Ellipses on noise, 72 x 96 (not square: the frame is padded)."""
    b = synthetic_batch(n, frame=96, seed=3)
    return [
        {"image": b["image"][i][:72], "gt": b["gt"][i][:72], "id": f"s{i}".encode()}
        for i in range(n)
    ]


def _coloured_source(n: int = 5) -> list[dict]:
    """Record 0: a disk (the object) on a field, both solid RED (so that resizing blends no
    other colour into the object); the others: a yellow square on a green or grey field. Every
    red pixel of a pasted example is the target's, and only the object's mask is pasted."""
    yy, xx = np.mgrid[:80, :100]
    out = []
    for i in range(n):
        if i == 0:
            gt = (yy - 40) ** 2 + (xx - 50) ** 2 <= 22**2
            img = np.broadcast_to(RED, (80, 100, 3))
        else:
            gt = (abs(yy - 30 - 4 * i) <= 12) & (abs(xx - 40 - 6 * i) <= 15)
            field = np.array([40, 160 + 10 * i, 60], np.uint8) if i % 2 else np.full(3, 128)
            img = np.where(gt[..., None], np.array([230, 220, 30], np.uint8), field)
        out.append({"image": img.astype(np.uint8), "gt": gt.astype(np.int8), "id": f"c{i}"})
    return out


def _data(**kw) -> ml_collections.FrozenConfigDict:
    d = tiny_test_config("full", FRAME).data
    for k, v in kw.items():
        d[k] = v
    return ml_collections.FrozenConfigDict(d)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _digest(batches: list[dict]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()


# The first 3 batches of make_train_dataset(tiny_test_config("full", 64), _textured_source())
# before copy-paste existed (num_workers=0): the default config must keep giving them.
DIGEST_BEFORE_COPY_PASTE = "4ff75e8310304e78fde0358c24f8f2a59c1c8fe2310c37de1d412f8a891af69d"


def test_off_by_default_is_bit_identical():
    cfg = tiny_test_config("full", FRAME)
    assert cfg.data.copy_paste_prob == 0.0
    it = iter(pipeline.make_train_dataset(cfg, _textured_source(), 0, 1))
    assert _digest([next(it) for _ in range(3)]) == DIGEST_BEFORE_COPY_PASTE
    # A pool with the probability 0 draws nothing: the same examples as without a pool.
    src, d = _textured_source(), _data()
    for seed in range(4):
        a = augment(src[seed], np.random.default_rng(seed), FRAME, d, 5.0)
        b = augment(src[seed], np.random.default_rng(seed), FRAME, d, 5.0, _Subset(src, [1, 2]))
        assert _same(a, b)


def test_detail_path_skips_the_discarded_click(monkeypatch):
    """With PatchDiff's image scale (k = 2) the first click is drawn once, by detail_example
    with its own rng: the examples are those of drawing (and dropping) one at k x the frame."""
    cfg = tiny_test_config("full", FRAME)
    cfg.model.refiners.patch_diff.image_scale = 2
    src = _textured_source()
    fast = iter(pipeline.make_train_dataset(cfg, src, 0, 1))
    a = [next(fast) for _ in range(3)]
    real = pipeline.augment
    drawn = []

    def with_click(*args, **kw):
        ex = real(*args[:6], **{**kw, "click": True})  # positional click dropped
        drawn.append(ex.pop("first_click"))
        return ex

    monkeypatch.setattr(pipeline, "augment", with_click)
    slow = iter(pipeline.make_train_dataset(cfg, src, 0, 1))
    b = [next(slow) for _ in range(3)]
    assert drawn and all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert a[0]["detail_image"].shape[1:] == (2 * FRAME, 2 * FRAME, 3)


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.6, 1.3)])
def test_pasted_object_keeps_mask_and_pixels_consistent(scale):
    src = _coloured_source()
    d = _data(copy_paste_prob=1.0, copy_paste_scale=scale, copy_paste_distractor_prob=0.0)
    d = ml_collections.FrozenConfigDict({**d.to_dict(), "jitter": 0.0})
    pool = _Subset(src, np.arange(len(src)))
    for seed in range(6):
        ex = augment(src[0], np.random.default_rng(seed), FRAME, d, 5.0, pool)
        h, w = ex["valid_hw"]
        img, gt = ex["image"][:h, :w], ex["gt"][:h, :w]
        assert (ex["gt"][h:] == -1).all() and (ex["gt"][:, w:] == -1).all()
        assert set(np.unique(gt)) <= {0, 1} and gt.sum() >= d.min_object_pixels
        # Image and mask agree both ways: the mask's pixels are the source object's colour
        # (exactly, or within the rounding of the premultiplied resize), and no other pixel is:
        # the rest is another record's image.
        tol = 0 if scale == (1.0, 1.0) else 4  # 8-bit premultiply and back at alpha >= 1/2
        red = np.abs(img.astype(int) - RED).max(-1) <= tol
        np.testing.assert_array_equal(red, gt == 1)
        assert gt[ex["first_click"][0], ex["first_click"][1]] == 1


def test_unscaled_paste_moves_the_example_object_unchanged():
    # Textured objects: the pasted pixels and mask are those of the example without
    # copy-paste (the same draws up to the paste), moved to the new position.
    src = _textured_source()
    d = _data(copy_paste_prob=1.0, copy_paste_scale=(1.0, 1.0), copy_paste_distractor_prob=0.0)
    d = ml_collections.FrozenConfigDict({**d.to_dict(), "jitter": 0.0})
    ref_d = ml_collections.FrozenConfigDict({**d.to_dict(), "copy_paste_prob": 0.0})
    pool = _Subset(src, np.arange(len(src)))
    moved = 0
    for seed in range(6):
        ex = augment(src[seed], np.random.default_rng(seed), FRAME, d, 5.0, pool)
        ref = augment(src[seed], np.random.default_rng(seed), FRAME, ref_d, 5.0)

        def box(gt):
            ys, xs = np.nonzero(gt == 1)
            return np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]

        b, rb = box(ex["gt"]), box(ref["gt"])
        m = ex["gt"][b] == 1
        np.testing.assert_array_equal(m, ref["gt"][rb] == 1)
        np.testing.assert_array_equal(ex["image"][b][m], ref["image"][rb][m])
        assert ex["radius"] == ref["radius"]
        moved += b != rb
    assert moved  # the object lands elsewhere


def test_distractor_covers_at_most_the_allowed_fraction():
    src = _coloured_source()
    d = _data(copy_paste_prob=1.0, copy_paste_scale=(1.0, 1.0), copy_paste_distractor_prob=1.0)
    d = ml_collections.FrozenConfigDict({**d.to_dict(), "jitter": 0.0})
    ref_d = ml_collections.FrozenConfigDict({**d.to_dict(), "copy_paste_prob": 0.0})
    pool = _Subset(src, np.arange(len(src)))
    yellow = np.array([230, 220, 30], np.uint8)
    covered = []
    for seed in range(12):
        ex = augment(src[0], np.random.default_rng(seed), FRAME, d, 5.0, pool)
        ref = augment(src[0], np.random.default_rng(seed), FRAME, ref_d, 5.0)
        h, w = ex["valid_hw"]
        img, gt = ex["image"][:h, :w], ex["gt"][:h, :w]
        np.testing.assert_array_equal((img == RED).all(-1), gt == 1)  # occluded: background
        n_before = int((ref["gt"] == 1).sum())
        cover = 1 - gt.sum() / n_before
        assert -1e-9 <= cover <= d.copy_paste_max_cover + 1e-9
        covered.append(cover)
        assert (np.abs(img.astype(int) - yellow).max(-1) <= 2).any()  # a distractor is there
    assert max(covered) > 0  # some distractor did overlap the object


def test_deterministic_per_seed_and_varied():
    src = _textured_source()
    d = _data(copy_paste_prob=1.0, copy_paste_distractor_prob=1.0)
    pool = _Subset(src, np.arange(len(src)))
    runs = [
        [augment(src[2], np.random.default_rng(s), FRAME, d, 5.0, pool) for s in range(4)]
        for _ in range(2)
    ]
    assert all(_same(a, b) for a, b in zip(*runs, strict=True))
    assert not _same(runs[0][0], runs[0][1])
    plain = augment(src[2], np.random.default_rng(0), FRAME, _data(), 5.0, pool)
    assert not np.array_equal(plain["image"], runs[0][0]["image"])


def test_transform_pickles_for_worker_processes():
    src = _textured_source()
    d = _data(copy_paste_prob=1.0)
    aug = _Augment(FRAME, d, 5.0, paste_pool=_Subset(src, np.arange(len(src))))
    clone = pickle.loads(pickle.dumps(aug))
    a = aug.random_map(src[1], np.random.default_rng(7))
    b = clone.random_map(src[1], np.random.default_rng(7))
    assert _same(a, b)


def test_make_train_dataset_with_copy_paste():
    cfg = tiny_test_config("full", FRAME)
    cfg.data.copy_paste_prob = 1.0
    cfg.data.jitter = 0.0
    src = _coloured_source()

    def batches():
        it = iter(pipeline.make_train_dataset(cfg, src, 0, 1))
        return [next(it) for _ in range(3)]

    first, again = batches(), batches()
    assert all(_same(a, b) for a, b in zip(first, again, strict=True))
    for b in first:
        assert b["image"].shape == (2, FRAME, FRAME, 3) and b["gt"].shape == (2, FRAME, FRAME)
        for gt, (h, w), (cy, cx) in zip(b["gt"], b["valid_hw"], b["first_click"], strict=True):
            assert gt[cy, cx] == 1 and (gt[:h, :w] >= 0).all()
    imgs = np.concatenate([b["image"] for b in first])
    gts = np.concatenate([b["gt"] for b in first])
    # Red (record 0's object and field) shows up beside other records' fields: pasted.
    field = [np.array([40, 170, 60]), np.full(3, 128)]
    on_new_bg = [
        (img == RED).all(-1).any() and any((img == f).all(-1).any() for f in field) for img in imgs
    ]
    assert any(on_new_bg)
    assert (gts <= 1).all()


def test_first_click_is_spread_over_the_interior():
    yy, xx = np.mgrid[:64, :64]
    obj = ((yy - 30) / 20.0) ** 2 + ((xx - 34) / 26.0) ** 2 <= 1
    dt = ndimage.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
    frac = float(tiny_test_config().data.first_click_frac)
    assert frac == 0.5  # what every config uses (base_config)
    rng = np.random.default_rng(0)
    clicks = {first_click(obj, rng, frac) for _ in range(50)}
    assert len(clicks) > 20  # many positions, not always the centre
    assert all(obj[y, x] and dt[y, x] >= frac * dt.max() for y, x in clicks)
    centre = {first_click(obj, rng, 1.0) for _ in range(10)}  # frac 1: the deepest pixel(s)
    assert all(dt[y, x] == dt.max() for y, x in centre)


def test_first_click_on_the_object_box_equals_the_whole_frame():
    """Same clicks, same generator draws, as the distance transform over the whole frame."""

    def whole_frame(obj, rng, frac):
        dt = ndimage.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
        m = dt.max()
        ys, xs = np.nonzero(dt >= max(frac * m, min(m, 1.0)))
        k = int(rng.integers(len(ys)))
        return int(ys[k]), int(xs[k])

    gen = np.random.default_rng(3)
    for i in range(40):
        obj = np.zeros((48, 56), bool)
        for _ in range(1 + i % 3):  # 1-3 blobs, some on the frame's edge, some of one pixel
            y, x = gen.integers(0, 48), gen.integers(0, 56)
            obj[y : y + gen.integers(1, 20), x : x + gen.integers(1, 20)] = True
        obj &= gen.random(obj.shape) > 0.1 * (i % 2)  # holes in every other mask
        frac = (0.0, 0.5, 1.0)[i % 3]
        a, b = np.random.default_rng(i), np.random.default_rng(i)
        assert first_click(obj, a, frac) == whole_frame(obj, b, frac)
        assert a.integers(1 << 30) == b.integers(1 << 30)
    empty = np.zeros((5, 7), bool)
    assert first_click(empty, np.random.default_rng(0), 0.5) == whole_frame(
        empty, np.random.default_rng(0), 0.5
    )


def test_cached_views_paste_and_their_fingerprint():
    from samref_jax.training import embedding_cache as ec

    cfg = tiny_test_config("full", FRAME)
    before = ml_collections.ConfigDict(cfg.to_dict())
    for k in [k for k in before.data if k.startswith("copy_paste")]:
        del before.data[k]
    assert ec.fingerprint(cfg) == ec.fingerprint(before)  # existing caches stay valid
    cfg.data.copy_paste_prob = 1.0
    cfg.data.jitter = 0.0
    assert ec.fingerprint(cfg) != ec.fingerprint(before)
    src = _coloured_source()
    view = ec._View(cfg, src, np.arange(len(src)))
    ex = view(0)  # record 0's first view: its object on another record's field
    red = np.abs(ex["image"].astype(int) - RED).max(-1) <= 4
    np.testing.assert_array_equal(red, ex["gt"] == 1)


def test_resume_of_a_run_from_before_copy_paste(tmp_path):
    import json

    from samref_jax.training.trainer import resume_config_changes

    config = tiny_test_config("full", FRAME)
    stored = json.loads(config.to_json_best_effort())
    for k in [k for k in stored["data"] if k.startswith("copy_paste")]:
        del stored["data"][k]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert resume_config_changes(tmp_path, config) == ([], [])  # off: the run it was
    config.data.copy_paste_prob = 0.5
    assert resume_config_changes(tmp_path, config)[0] == ["data.copy_paste_prob"]


def test_input_pipeline_benchmark_smoke(coco_mval_dir):
    """``benchmarks/input_pipeline.py`` on the real COCO_MVal prints its table, peers included."""
    from tests.fake_devices import run_python

    args = ["--data-dir", str(coco_mval_dir), "--examples", "2"]
    out = run_python(["benchmarks/input_pipeline.py", *args], env={"JAX_PLATFORMS": "cpu"})
    for needle in (
        "| augment at 2048 (`augment`) |",
        "| cached view: read + decode",
        "| cached view, pixels zlib'd in the record",
        "| the recipe's Grain dataset (`make_train_dataset`), CPU time |",
        "| peer: Pillow decode + resize to 1024 + pad",
        "worker cores",
    ):
        assert needle in out, (needle, out[-2000:])
