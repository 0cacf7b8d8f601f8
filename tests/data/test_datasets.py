"""Dataset folders, decoding rules and TFDS/ArrayRecord builders read back through Grain."""

from __future__ import annotations

import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from samref_jax.data import DataError, read_folder_dataset
from samref_jax.data.decode import read_image
from samref_jax.data.tfds_builders import grain_source, prepare

RNG = np.random.default_rng(0)
VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 251) + [224, 224, 192]


def _rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(arr: np.ndarray, path: Path, mode: str | None = None, palette=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode)
    if palette is not None:
        im.putpalette(palette)
    im.save(path)


def _trimap(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[2 : h - 2, 3 : w - 3] = 255
    m[2, 3 : w - 3] = 128  # ignore band
    return m


# Fixture writers, one per upstream layout. Each returns {sample id: expected gt}.


def make_grabcut(root: Path) -> dict:
    _save(_rgb(12, 16), root / "data_GT" / "a.jpg")
    _save(_rgb(10, 9), root / "data_GT" / "b.bmp")
    _save(_rgb(8, 8)[..., 0], root / "data_GT" / "c.png")  # greyscale image
    exp = {}
    for stem, (h, w) in {"a": (12, 16), "b": (10, 9), "c": (8, 8)}.items():
        m = _trimap(h, w)
        _save(m, root / "boundary_GT" / f"{stem}.bmp")
        exp[stem] = np.where(m == 128, -1, (m > 128).astype(np.int8)).astype(np.int8)
    (root / "SOURCE.md").write_text("not an image\n")
    return exp


def make_berkeley(root: Path) -> dict:
    exp = {}
    for stem, (h, w) in {"12003": (9, 11), "42049": (7, 13)}.items():
        _save(_rgb(h, w), root / "images" / f"{stem}.jpg")
        m = _trimap(h, w)
        _save(np.stack([m, m, m], -1), root / "masks" / f"{stem}.png")  # RGB mask
        exp[stem] = np.where(m == 128, -1, (m > 128).astype(np.int8)).astype(np.int8)
    return exp


def make_davis(root: Path) -> dict:
    exp = {}
    for stem, (h, w) in {"bear_00000": (9, 12), "dog_00010": (11, 7)}.items():
        _save(_rgb(h, w), root / "img" / f"{stem}.jpg")
        idx = np.zeros((h, w), np.uint8)
        idx[1:5, 1:5] = 1  # palette colour (128, 0, 0): object by max over channels
        idx[6:8, 2:4] = 2
        _save(idx, root / "gt" / f"{stem}.png", "P", VOC_PALETTE)
        exp[stem] = (idx > 0).astype(np.int8)
    return exp


def make_coco_mval(root: Path) -> dict:
    exp = {}
    for stem, (h, w) in {"cat00_0001": (10, 10), "dog01_0002": (6, 14)}.items():
        img = _rgb(h, w)
        _save(img[..., 0] if stem.startswith("dog") else img, root / "img" / f"{stem}.jpg")
        m = np.zeros((h, w), np.uint8)
        m[1:4, 2:9] = 255
        _save(m, root / "gt" / f"{stem}.png")
        exp[stem] = (m == 255).astype(np.int8)
    return exp


def make_sbd(root: Path) -> dict:
    exp = {}
    splits = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000005"]}
    for split, ids in splits.items():
        (root / f"{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for n, stem in enumerate(ids):
            h, w = 9 + n, 12
            _save(_rgb(h, w), root / "img" / f"{stem}.jpg")
            seg = np.zeros((h, w), np.uint8)
            seg[1:4, 1:5] = 1
            seg[5:8, 6:11] = 2 + n  # ids need not be contiguous
            (root / "inst").mkdir(exist_ok=True)
            gtinst = {"Segmentation": seg, "Boundaries": np.zeros(1), "Categories": [[15], [7]]}
            savemat(str(root / "inst" / f"{stem}.mat"), {"GTinst": gtinst})
            for inst in (1, 2 + n):
                exp[(split, f"{stem}#{inst}")] = (seg == inst).astype(np.int8)
    return exp


def make_voc(root: Path) -> dict:
    exp = {}
    splits = {"train": ["2007_000032"], "val": ["2007_000033", "2007_000039"]}
    for split, ids in splits.items():
        lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        lst.parent.mkdir(parents=True, exist_ok=True)
        lst.write_text("\n".join(ids) + "\n")
        for stem in ids:
            h, w = 10, 13
            _save(_rgb(h, w), root / "JPEGImages" / f"{stem}.jpg")
            idx = np.zeros((h, w), np.uint8)
            idx[1:5, 1:6] = 1
            idx[6:9, 7:12] = 2
            idx[5, :] = 255  # boundary: ignore
            _save(idx, root / "SegmentationObject" / f"{stem}.png", "P", VOC_PALETTE)
            for inst in (1, 2):
                g = (idx == inst).astype(np.int8)
                g[idx == 255] = -1
                exp[(split, f"{stem}#{inst}")] = g
    return exp


LAYOUTS = {
    "GrabCut": (make_grabcut, "GrabCut", ["test"]),
    "Berkeley": (make_berkeley, "Berkeley", ["test"]),
    "DAVIS": (make_davis, "DAVIS", ["test"]),
    "COCO_MVal": (make_coco_mval, "COCO_MVal", ["test"]),
    "SBD": (make_sbd, "SBD", ["train", "val"]),
    "PascalVOC": (make_voc, "PascalVOC", ["train", "val"]),
}


def _expected_for(exp: dict, split: str) -> dict:
    if all(isinstance(k, str) for k in exp):
        return exp
    return {k[1]: v for k, v in exp.items() if k[0] == split}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_builder_prepares_and_reads_back_through_grain(name, tmp_path):
    make, folder, splits = LAYOUTS[name]
    root = tmp_path / folder
    exp = make(root)
    builder = prepare(name, manual_dir=root, data_dir=tmp_path / "tfds")
    assert sorted(builder.info.splits.keys()) == sorted(splits)
    for split in splits:
        expected = _expected_for(exp, split)
        folder_ds = read_folder_dataset(name, root, split)
        assert folder_ds.ids == sorted(expected, key=lambda s: (s.split("#")[0], s))
        ds = grain.MapDataset.source(grain_source(name, tmp_path / "tfds", split))
        assert len(ds) == len(expected) == len(folder_ds)
        for i in range(len(ds)):
            rec, ref = ds[i], folder_ds[i]
            sid = rec["id"].decode()
            assert sid == ref["id"]
            np.testing.assert_array_equal(rec["gt"], expected[sid])
            np.testing.assert_array_equal(rec["gt"], ref["gt"])
            np.testing.assert_array_equal(rec["image"], ref["image"])
            assert rec["image"].dtype == np.uint8 and rec["image"].shape[2] == 3
            assert rec["gt"].dtype == np.int8 and rec["gt"].shape == rec["image"].shape[:2]
    # Preparing again is a no-op, and a Grain pipeline maps over it.
    prepare(name, manual_dir=root, data_dir=tmp_path / "tfds")
    first = grain.MapDataset.source(grain_source(name, tmp_path / "tfds")).map(
        lambda r: int((r["gt"] == 1).sum())
    )[0]
    assert first > 0
    assert "tensorflow" not in sys.modules


def test_pascal_voc_rgb_rendered_masks_use_grey_220_as_ignore(tmp_path):
    root = tmp_path / "VOC"
    make_voc(root)
    idx = np.asarray(Image.open(root / "SegmentationObject" / "2007_000033.png"))
    rgb = np.asarray(Image.open(root / "SegmentationObject" / "2007_000033.png").convert("RGB"))
    _save(rgb, root / "SegmentationObject" / "2007_000033.png")  # saved as colour, like cv2
    ds = read_folder_dataset("voc", root, "val")
    gts = [ds[i]["gt"] for i, s in enumerate(ds.ids) if s.startswith("2007_000033")]
    assert len(gts) == 2  # grey values 38 and 75 are the instances; 220 is ignore
    for g in gts:
        np.testing.assert_array_equal(g == -1, idx == 255)
    assert {int((g == 1).sum()) for g in gts} == {int((idx == 1).sum()), int((idx == 2).sum())}


def test_missing_mask_names_the_files(tmp_path):
    root = tmp_path / "GrabCut"
    make_grabcut(root)
    (root / "boundary_GT" / "b.bmp").unlink()
    with pytest.raises(DataError, match=r"data_GT/b\.bmp.*boundary_GT/b"):
        read_folder_dataset("GrabCut", root)
    with pytest.raises(DataError, match=r"data_GT/b\.bmp"):
        prepare("GrabCut", manual_dir=root, data_dir=tmp_path / "tfds")


def test_unmatched_mask_names_the_file(tmp_path):
    root = tmp_path / "COCO_MVal"
    make_coco_mval(root)
    _save(np.zeros((4, 4), np.uint8), root / "gt" / "zebra00_0003.png")
    with pytest.raises(DataError, match=r"gt/zebra00_0003\.png matches no image"):
        read_folder_dataset("COCO_MVal", root)


def test_listed_instance_files_missing_name_the_file(tmp_path):
    root = tmp_path / "SBD"
    make_sbd(root)
    (root / "inst" / "2008_000005.mat").unlink()
    with pytest.raises(DataError, match=r"inst/2008_000005\.mat"):
        read_folder_dataset("SBD", root, "val")
    (root / "img" / "2008_000003.jpg").unlink()
    with pytest.raises(DataError, match=r"img/2008_000003\.jpg"):
        read_folder_dataset("SBD", root, "train")


def test_size_mismatch_and_bad_files_name_the_files(tmp_path):
    root = tmp_path / "DAVIS"
    make_davis(root)
    _save(np.zeros((3, 3), np.uint8), root / "gt" / "dog_00010.png")
    ds = read_folder_dataset("DAVIS", root)
    with pytest.raises(DataError, match=r"img/dog_00010\.jpg.*gt/dog_00010\.png"):
        ds[1]
    (root / "gt" / "bear_00000.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"gt/bear_00000\.png"):
        read_folder_dataset("DAVIS", root)[0]
    with pytest.raises(DataError, match="missing"):
        read_image(root / "img" / "nope.jpg")


def test_duplicate_stems_are_rejected(tmp_path):
    root = tmp_path / "GrabCut"
    make_grabcut(root)
    _save(_rgb(12, 16), root / "data_GT" / "a.png")
    with pytest.raises(DataError, match="a.jpg.*a.png|a.png.*a.jpg"):
        read_folder_dataset("GrabCut", root)


# -- real data -----------------------------------------------------------------------------------


def test_real_grabcut_folder_and_builder(grabcut_dir, tmp_path):
    ds = read_folder_dataset("GrabCut", grabcut_dir)
    assert len(ds) == 50 and "banana1" in ds.ids and "124080" in ds.ids
    with_band = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].dtype == np.uint8 and s["image"].shape[:2] == s["gt"].shape
        assert set(np.unique(s["gt"])) <= {-1, 0, 1}
        with_band += bool((s["gt"] == -1).any())
    assert with_band == 42  # SOURCE.md: 8 masks have no 128 band
    prepare("GrabCut", manual_dir=grabcut_dir, data_dir=tmp_path)
    src = grain.MapDataset.source(grain_source("GrabCut", tmp_path, "test"))
    assert len(src) == 50
    for i in (0, 17, 49):
        np.testing.assert_array_equal(src[i]["gt"], ds[i]["gt"])
        np.testing.assert_array_equal(src[i]["image"], ds[i]["image"])
    assert "tensorflow" not in sys.modules


@pytest.mark.slow
def test_real_coco_mval_builder(coco_mval_dir, tmp_path):
    """All 800 instances (about 40 s: zlib-compressing ~0.5 GB of pixels on one core)."""
    ds = read_folder_dataset("COCO_MVal", coco_mval_dir)
    assert len(ds) == 800
    prepare("COCO_MVal", manual_dir=coco_mval_dir, data_dir=tmp_path)
    src = grain.MapDataset.source(grain_source("COCO_MVal", tmp_path))
    assert len(src) == 800
    for i in (0, 399, 799):
        rec, ref = src[i], ds[i]
        assert rec["id"].decode() == ref["id"]
        np.testing.assert_array_equal(rec["gt"], ref["gt"])
        np.testing.assert_array_equal(rec["image"], ref["image"])
        assert set(np.unique(rec["gt"])) == {0, 1}
    assert "tensorflow" not in sys.modules
