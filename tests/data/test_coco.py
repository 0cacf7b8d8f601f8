"""COCO-format instance data: the builder (one record per image, masks as RLE, COCO + LVIS
merged, crowd regions, sharded preparation), the instance sampler (area filter, merged
objects, ignore), the prepare-coco command, and training end to end on it with a resume.

The fixture is a small COCO-format set made from the real COCO_MVal masks: its instances
grouped by COCO image, written as polygons (traced with OpenCV), compressed RLE and one
uncompressed RLE, plus a crowd region, a tiny instance, and an LVIS-style second file
(``coco_url``, no ``file_name``) that repeats one instance and adds another and one image.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections import defaultdict

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samref_jax.data import coco
from samref_jax.data.decode import DataError

FRAME = 64
# COCO images with several COCO_MVal instances each, and one with a single instance.
IMAGE_IDS = ("000000066841", "000000507037", "000000281693")
LVIS_ONLY = "000000485972"
CROWD_ID, TINY_ID, LVIS_NEW_ID, LVIS_DUP_ID = 9001, 9002, 9101, 9102


def _mask(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L")) == 255


def _rle_str(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


def _uncompressed(m: np.ndarray) -> dict:
    flat = m.astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(m.shape), "counts": counts}


def _polygons(m: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory, coco_mval_dir):
    """``(root, expected)``: ``root`` holds images/, coco.json, lvis.json; ``expected`` maps
    annotation id -> (mask, kind) for what the prepared records must hold."""
    root = tmp_path_factory.mktemp("coco_set")
    (root / "images").mkdir()
    by_image = defaultdict(list)
    for p in sorted((coco_mval_dir / "gt").glob("*.png")):
        by_image[p.stem.rsplit("_", 1)[1]].append(p)
    images, anns, expected, ann_id = [], [], {}, 1
    for n, iid in enumerate(IMAGE_IDS):
        stem = by_image[iid][0].stem
        shutil.copy(coco_mval_dir / "img" / f"{stem}.jpg", root / "images" / f"{iid}.jpg")
        masks = [_mask(p) for p in by_image[iid]]
        h, w = masks[0].shape
        images.append({"id": int(iid), "file_name": f"{iid}.jpg", "height": h, "width": w})
        for k, m in enumerate(masks):
            if n == 2 and k == 0:
                seg, kind = _uncompressed(m), "rle"
            elif k % 2 == 0:
                seg, kind = _polygons(m), "polygon"
            else:
                seg, kind = _rle_str(m), "rle"
            anns.append(
                {"id": ann_id, "image_id": int(iid), "category_id": 1 + k, "iscrowd": 0}
                | {"segmentation": seg}
            )
            expected[ann_id] = (m, kind)
            ann_id += 1
        if n == 0:  # a tiny object (16 pixels) in a free corner
            tiny = np.zeros((h, w), bool)
            free = ~np.any(masks, axis=0)
            ys, xs = np.nonzero(free[: h // 2, : w // 2])
            y0, x0 = max(ys.min(), 0), max(xs.min(), 0)
            tiny[y0 : y0 + 4, x0 : x0 + 4] = True
            tiny &= free
            anns.append(
                {"id": TINY_ID, "image_id": int(iid), "category_id": 7, "iscrowd": 0}
                | {"segmentation": _rle_str(tiny)}
            )
            expected[TINY_ID] = (tiny, "rle")
        if n == 1:  # a crowd region: the bottom-right quarter
            crowd = np.zeros((h, w), bool)
            crowd[h // 2 :, w // 2 :] = True
            anns.append(
                {"id": CROWD_ID, "image_id": int(iid), "category_id": 1, "iscrowd": 1}
                | {"segmentation": _uncompressed(crowd)}
            )
            expected[CROWD_ID] = (crowd, "crowd")
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))

    # LVIS-style: images by coco_url; the first COCO instance again (a duplicate), a new
    # instance on the first image, and an image that only this file lists.
    url = "http://images.cocodataset.org/val2017/{}.jpg"
    first = IMAGE_IDS[0]
    m0, _ = expected[1]
    h, w = m0.shape
    new = np.zeros((h, w), bool)
    new[h // 3 : h // 3 + 30, w // 3 : w // 3 + 40] = True
    stem = by_image[LVIS_ONLY][0].stem
    shutil.copy(coco_mval_dir / "img" / f"{stem}.jpg", root / "images" / f"{LVIS_ONLY}.jpg")
    m_only = _mask(by_image[LVIS_ONLY][0])
    lvis_images = [
        {"id": int(first), "coco_url": url.format(first), "height": h, "width": w},
        {"id": int(LVIS_ONLY), "coco_url": url.format(LVIS_ONLY)}
        | {"height": m_only.shape[0], "width": m_only.shape[1]},
    ]
    lvis_anns = [
        {"id": LVIS_DUP_ID, "image_id": int(first), "category_id": 5, "segmentation": _rle_str(m0)},
        {
            "id": LVIS_NEW_ID,
            "image_id": int(first),
            "category_id": 6,
            "segmentation": _rle_str(new),
        },
        {"id": 9103, "image_id": int(LVIS_ONLY), "category_id": 3}
        | {"segmentation": _polygons(m_only)},
    ]
    expected[LVIS_DUP_ID] = (m0, "rle")
    expected[LVIS_NEW_ID] = (new, "rle")
    expected[9103] = (m_only, "polygon")
    (root / "lvis.json").write_text(json.dumps({"images": lvis_images, "annotations": lvis_anns}))
    return root, expected


def _prepare(root, data_dir, **kw):
    from samref_jax.data.coco_tfds import prepare_coco

    files = [str(root / "lvis.json"), str(root / "coco.json")]  # LVIS first
    return prepare_coco(
        "tiny_coco", files, [str(root / "images")], data_dir, log=lambda *a: None, **kw
    )


@pytest.fixture(scope="module")
def prepared(coco_set, tmp_path_factory):
    from samref_jax.data.coco_tfds import coco_source

    root, _ = coco_set
    data_dir = tmp_path_factory.mktemp("tfds")
    _prepare(root, data_dir)
    return coco_source("tiny_coco", data_dir), data_dir


def test_records_one_per_image_masks_decode(coco_set, prepared):
    root, expected = coco_set
    src, _ = prepared
    keys = [coco._text(src[k]["id"]) for k in range(len(src))]
    assert keys == sorted(f"{i}.jpg" for i in (*IMAGE_IDS, LVIS_ONLY))  # each image once
    seen = set()
    for k in range(len(src)):
        r = src[k]
        image = coco.decode_image_bytes(r["image"], r["hw"])
        iid = coco._text(r["id"])[:-4]
        stem = next((root / "images").glob(f"{iid}.jpg"))
        np.testing.assert_array_equal(image, coco.decode_image_bytes(stem.read_bytes()))
        masks = coco.decode_masks(r, range(len(r["masks"])))
        for i, aid in enumerate(r["ann_id"].tolist()):
            seen.add(aid)
            want, kind = expected[aid]
            assert r["area"][i] == masks[i].sum()
            assert bool(r["crowd"][i]) == (kind == "crowd"), aid
            if kind == "polygon":
                assert _iou(masks[i], want) > 0.85, (aid, _iou(masks[i], want))
            else:
                np.testing.assert_array_equal(masks[i], want, err_msg=str(aid))
    # LVIS first: the COCO copy of its instance (annotation 1, a polygon) is the duplicate.
    assert seen == set(expected) - {1}
    first = src[0]
    assert coco._text(first["id"]) == f"{IMAGE_IDS[0]}.jpg"
    assert pickle.loads(pickle.dumps(src))[0]["image"] == first["image"]  # Grain workers
    assert first["source"].tolist()[:2] == [0, 0] and set(first["source"][2:]) == {1}


def test_sampler_area_filter_crowd_ignore_and_merge(prepared):
    src, _ = prepared
    crowd_rec = next(src[k] for k in range(len(src)) if src[k]["crowd"].any())
    got = set()
    for s in range(40):
        smp = coco.sample_instance(crowd_rec, np.random.default_rng(s), min_area=100)
        got.add(int(smp["id"].split("#")[1]))
        assert smp["gt"].dtype == np.int8 and smp["gt"].shape == tuple(crowd_rec["hw"])
        assert (smp["gt"] == -1).any() and (smp["gt"] == 1).any()  # crowd pixels are ignore
    assert CROWD_ID not in got and len(got) > 1
    first = src[0]  # holds the 16-pixel instance

    def ids(record, min_area):
        draws = [
            coco.sample_instance(record, np.random.default_rng(s), min_area=min_area)
            for s in range(60)
        ]
        return {d["id"].split("#")[1] for d in draws}

    assert str(TINY_ID) in ids(first, 0) and str(TINY_ID) not in ids(first, 100)
    assert coco.sample_instance(first, np.random.default_rng(0), min_area=1e9) is None
    largest = coco.largest_instance(first)
    assert largest["gt"].sum() == first["area"][~first["crowd"]].max()


def test_merged_objects_are_touching_unions():
    h, w = 40, 60
    a = np.zeros((h, w), bool)
    a[5:15, 5:15] = True
    b = np.zeros((h, w), bool)
    b[15:25, 5:15] = True  # touches a
    far = np.zeros((h, w), bool)
    far[30:38, 45:55] = True
    masks = [a, b, far]
    record = {
        "image": _png(np.zeros((h, w, 3), np.uint8)),
        "id": b"synthetic.png",
        "hw": np.array([h, w], np.int32),
        "masks": [_rle_str(m)["counts"].encode() for m in masks],
        "area": np.array([m.sum() for m in masks], np.float32),
        "crowd": np.zeros(3, bool),
        "ann_id": np.array([1, 2, 3], np.int64),
    }
    unions = set()
    for s in range(30):
        smp = coco.sample_instance(record, np.random.default_rng(s), merge_prob=1.0, max_merged=3)
        obj = smp["gt"] == 1
        parts = tuple(sorted(smp["id"].split("#")[1].split("+")))
        unions.add(parts)
        np.testing.assert_array_equal(obj, np.any([masks[int(p) - 1] for p in parts], axis=0))
    assert unions == {("1", "2"), ("3",)}  # the far object touches nothing
    single = {
        coco.sample_instance(record, np.random.default_rng(s), merge_prob=0.0, max_merged=3)["id"]
        for s in range(20)
    }
    assert all("+" not in i for i in single)


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_sharded_preparation_equals_unsharded(coco_set, prepared, tmp_path):
    """Three shards written by three 'processes' (in turn) read back as the unsharded set,
    record for record; a rerun skips finished shards; a partial set is refused."""
    from samref_jax.data.coco_tfds import CocoNotPreparedError, coco_source

    root, _ = coco_set
    one, _ = prepared
    for j in (2, 0):
        _prepare(root, tmp_path, num_shards=3, shards=[j])
    with pytest.raises(CocoNotPreparedError, match="1 of 3 shards missing"):
        coco_source("tiny_coco", tmp_path)
    assert _prepare(root, tmp_path, num_shards=3, shards=[0, 1])["skipped_existing"] == [0]
    three = coco_source("tiny_coco", tmp_path)
    assert three.num_shards == 3 and len(three) == len(one) == 4
    for k in range(len(one)):
        a, b = one[k], three[k]
        assert a["image"] == b["image"] and list(a["masks"]) == list(b["masks"])
        for f in ("id", "hw", "area", "category", "crowd", "ann_id", "source"):
            np.testing.assert_array_equal(a[f], b[f], err_msg=f)


def test_prepare_coco_command(coco_set, tmp_path, capsys):
    from samref_jax import cli

    root, _ = coco_set
    base = ["prepare-coco", "--name", "tiny_coco", "--data-dir", str(tmp_path)]
    base += ["--annotations", str(root / "lvis.json"), "--annotations", str(root / "coco.json")]
    # User errors: one line, status 2.
    assert cli.main([*base, "--images", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samref prepare-coco: error: image folder not found") and "\n" not in err
    assert cli.main([*base, "--images", str(root / "images"), "--process-index", "2"]) == 2
    assert "--process-index must be in 0..0" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main([*base[:5], "--annotations", str(bad), "--images", str(root)]) == 2
    assert "not a COCO-format instance file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([*base, "--images", str(empty)]) == 2
    assert "are in none of the image folders" in capsys.readouterr().err
    args = [*base, "--images", str(root / "images"), "--num-shards", "2"]
    assert cli.main([*args, "--process-index", "1", "--process-count", "2"]) == 0
    assert cli.main([*args, "--process-index", "0", "--process-count", "2"]) == 0
    assert "split sizes {'train': 4}" in capsys.readouterr().out
    # The same name prepared from other settings is refused.
    assert cli.main([*args, "--dedup-iou", "0"]) == 2
    assert "prepared from other sources or settings" in capsys.readouterr().err


def test_bad_segmentations_are_named():
    with pytest.raises(DataError, match="image a, annotation 3: RLE size"):
        coco.encode_segmentation({"size": [2, 2], "counts": "00"}, 3, 3, "image a, annotation 3")
    with pytest.raises(DataError, match="does not cover"):
        coco.encode_segmentation({"size": [3, 3], "counts": [1, 2]}, 3, 3, "x")
    # A 4-number "polygon" is not read as a box: an empty mask.
    counts = coco.encode_segmentation([[0, 0, 2, 2]], 3, 3, "x")
    assert mask_utils.area({"size": [3, 3], "counts": counts}) == 0


def _coco_config(prepared_dir):
    from samref_jax.training.testing import tiny_test_config

    cfg = tiny_test_config("full", FRAME, rounds=2)
    cfg.data.format = "coco"
    cfg.data.name = "tiny_coco"
    cfg.data.data_dir = str(prepared_dir)
    cfg.data.coco.min_area = 100.0
    cfg.data.coco.merge_prob = 0.5
    return cfg


def test_pipeline_examples_match_folder_format(prepared):
    """The COCO source yields the folder pipeline's example keys, shapes and dtypes; the
    iterator is deterministic and restores from its state; held-out images give samples."""
    from samref_jax.training.pipeline import heldout_samples, make_train_dataset, prepare_source

    _, data_dir = prepared
    cfg = _coco_config(data_dir)
    src = prepare_source(cfg, data_dir)
    it = iter(make_train_dataset(cfg, src))
    batches = [next(it) for _ in range(2)]
    state = it.get_state()
    nxt = next(it)
    b = batches[0]
    assert set(b) == {"image", "gt", "valid_hw", "first_click", "radius"}
    assert b["image"].shape == (2, FRAME, FRAME, 3) and b["image"].dtype == np.uint8
    assert b["gt"].shape == (2, FRAME, FRAME) and b["gt"].dtype == np.int8
    assert b["valid_hw"].dtype == np.int32 and b["first_click"].dtype == np.int32
    assert b["radius"].shape == (2,) and b["radius"].dtype == np.float32
    ys, xs = b["first_click"][:, 0], b["first_click"][:, 1]
    assert np.all(b["gt"][np.arange(2), ys, xs] == 1)
    it2 = iter(make_train_dataset(cfg, src))
    it2.set_state(state)
    for k, v in next(it2).items():
        np.testing.assert_array_equal(v, nxt[k])
    cfg.data.heldout_every = 2
    held = heldout_samples(cfg, src)
    assert len(held) == 2 and all(h["gt"].shape == (FRAME, FRAME) for h in held)
    # Copy-paste draws other image records as backgrounds and distractors.
    cfg.data.copy_paste_prob = cfg.data.copy_paste_distractor_prob = 1.0
    b = next(iter(make_train_dataset(cfg, src)))
    assert b["image"].shape == (2, FRAME, FRAME, 3)
    ys, xs = b["first_click"][:, 0], b["first_click"][:, 1]
    assert np.all(b["gt"][np.arange(2), ys, xs] == 1)


@pytest.mark.slow
def test_train_on_coco_checkpoint_resume(prepared, tmp_path, capsys):
    """A few steps of the tiny model (sam mode: the smallest step) on the COCO-format set,
    with an epath workdir; the run cut back to its step-2 checkpoint (a crash after it) and
    resumed repeats steps 3 and 4 with identical losses."""
    import shutil

    import jax
    from etils import epath

    from samref_jax.training.trainer import train

    _, data_dir = prepared
    cfg = _coco_config(data_dir)
    cfg.mode = "sam"
    cfg.train.num_steps = 4
    cfg.train.checkpoint_every_steps = 2
    old = jax.config.jax_compilation_cache_dir  # the resumed run reuses the compiled step
    jax.config.update("jax_compilation_cache_dir", old or str(tmp_path / "jax_cache"))
    try:
        a, b = epath.Path(str(tmp_path / "a")), epath.Path(str(tmp_path / "b"))
        train(cfg, a, progress=False, export=False)
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
        assert sorted(p.name for p in (b / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
        train(cfg, b, progress=False, export=False)
    finally:
        jax.config.update("jax_compilation_cache_dir", old)

    def rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert np.isfinite(x["loss"])
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(x["iou"], y["iou"], rtol=1e-6, atol=1e-7)
    assert "resumed from step 2" in capsys.readouterr().err  # b's steps 3, 4 were recomputed


@pytest.mark.slow
def test_cache_embeddings_on_coco(prepared):
    """The embedding cache of a COCO-format set: data.cached_views views per training image,
    each a sampled instance's example with its embedding, beside the prepared records; the
    pipeline then trains on them."""
    import jax

    from samref_jax.training import step as S
    from samref_jax.training.embedding_cache import (
        build_cache,
        cache_location,
        open_cache,
        source_data_dir,
    )
    from samref_jax.training.pipeline import make_train_dataset, prepare_source

    _, data_dir = prepared
    cfg = _coco_config(data_dir)
    cfg.train.trainable = ("sam/mask_decoder", "global_diff", "patch_diff")
    cfg.data.cached_views = 2
    cfg.data.cache_dtype = "float32"
    src = prepare_source(cfg, data_dir)
    assert source_data_dir(src) == data_dir
    where = cache_location(cfg, data_dir)
    assert where.parent == data_dir / "embeddings" / "samref_coco_tiny_coco"
    params = S.init_params(cfg, jax.random.key(0, impl="rbg"))
    meta = build_cache(cfg, src, where, params, records_per_shard=3)
    assert meta["num_instances"] == 4 and meta["num_records"] == 8
    cfg.data.use_cached_embeddings = True
    cache = open_cache(cfg, data_dir)
    for r in range(len(cache)):
        ex = cache[r]
        assert (ex["gt"] == 1).any() and ex["embedding"].shape == tuple(meta["embedding_shape"])
    batch = next(iter(make_train_dataset(cfg, src)))
    assert batch["embedding"].shape == (2, *meta["embedding_shape"])


def test_annotations_are_read_compactly(coco_set, tmp_path):
    """Annotations come back as slotted records with float64 polygon arrays and int64
    uncompressed RLE counts, image entries with their five used fields; malformed entries get
    one error line naming the file or the annotation."""
    root, expected = coco_set
    data = coco.load_annotation_file(root / "coco.json")
    anns = data["annotations"]
    assert all(isinstance(a, coco.CocoAnnotation) for a in anns)
    polys = [a for a in anns if expected[a.id][1] == "polygon"]
    assert polys and all(
        isinstance(p, np.ndarray) and p.dtype == np.float64 and p.ndim == 1
        for a in polys
        for p in a.segmentation
    )
    crowd = next(a for a in anns if a.id == CROWD_ID)
    assert crowd.iscrowd and crowd.segmentation["counts"].dtype == np.int64
    raw = json.loads((root / "coco.json").read_text())
    assert data["images"] == [
        {k: v for k, v in im.items() if k in ("id", "file_name", "height", "width")}
        for im in raw["images"]
    ]
    # Same masks as from the JSON as written.
    img = next(im for im in raw["images"] if im["id"] == polys[0].image_id)
    first_raw = next(a for a in raw["annotations"] if a["id"] == polys[0].id)
    h, w = img["height"], img["width"]
    assert coco.encode_segmentation(polys[0].segmentation, h, w) == coco.encode_segmentation(
        first_raw["segmentation"], h, w
    )

    def write(anns_json):
        f = tmp_path / "bad.json"
        f.write_text(json.dumps({"images": raw["images"][:1], "annotations": anns_json}))
        return f

    iid = raw["images"][0]["id"]
    with pytest.raises(DataError, match="annotation 1 is not a JSON object"):
        coco.load_annotation_file(write([raw["annotations"][0], 5]))
    for seg, what in (
        ([[[1, 2]] * 6], "a polygon is not flat"),
        ([["a"] * 6], "malformed segmentation"),
        (None, "neither polygons nor RLE"),
    ):
        ann = {"id": 77, "image_id": iid, "category_id": 1, "segmentation": seg}
        (entry,) = coco.index_images([coco.load_annotation_file(write([ann]))])
        with pytest.raises(DataError, match=f"annotation 77: .*{what}"):
            coco.encode_instances(entry)


def test_index_memory_benchmark_smoke(tmp_path):
    """``benchmarks/coco_index_memory.py`` at a tiny scale prints its table, peer included."""
    from tests.fake_devices import run_python

    args = [
        "--scale",
        "0.0005",
        "--dir",
        str(tmp_path),
        "--num-shards",
        "4",
        "--process-count",
        "2",
    ]
    out = run_python(["benchmarks/coco_index_memory.py", *args])
    for needle in (
        "| peer: parse LVIS with plain `json.load` |",
        "| parse + index LVIS + COCO |",
        "| prepare-coco, process 0 of 2: parse, index, write 2 of 4 shards |",
    ):
        assert needle in out, (needle, out[-2000:])
