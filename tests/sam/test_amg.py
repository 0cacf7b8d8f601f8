"""Automatic mask generation: our `SamAutomaticMaskGenerator` against the official one on the
same random-weight SAM, and each mask utility against the official `utils.amg` function.

Random weights: every parameter of a small official SAM drawn as in `test_sam_parity.py`, with
`randomize_`'s gain 3 instead of 1: at gain 1 the random decoder's masks barely depend on the
point (every mask spans the whole image, so box NMS leaves one). The thresholds are lowered
for the junk scores of a random model so that tens of masks survive. The official generator
runs with `tests.torchvision_stub`'s `batched_nms` (torchvision's CPU kernel in torch with
ties in index order, like ours).
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samref_jax.sam import amg, sam_config
from samref_jax.sam.automatic_mask_generator import SamAutomaticMaskGenerator
from samref_jax.sam.build import SamModel
from samref_jax.sam.convert import convert_state_dict
from tests.sam_reference import build_torch_sam, randomize_, state_dict_numpy, torch

from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator  # isort: skip
from segment_anything.utils import amg as official  # isort: skip

GAIN = 3.0
IMAGE_HW = (120, 160)  # larger than the tiny model's 128 frame: masks are resized back up


@pytest.fixture(scope="module")
def models():
    cfg = sam_config("tiny")
    ts = randomize_(build_torch_sam(cfg), seed=3, gain=GAIN).requires_grad_(False)
    _, params = convert_state_dict(state_dict_numpy(ts), config=cfg)
    return ts, SamModel(cfg, jax.tree_util.tree_map(jnp.asarray, params))


@pytest.fixture(scope="module")
def image():
    return (np.random.RandomState(0).rand(*IMAGE_HW, 3) * 255).astype(np.uint8)


def _decode(seg, mode):
    if mode == "binary_mask":
        return seg
    if mode == "uncompressed_rle":
        return amg.rle_to_mask(seg)
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def _compare(ref, ours, mode):
    assert len(ours) == len(ref)
    assert [r["bbox"] for r in ours] == [r["bbox"] for r in ref]
    assert [r["crop_box"] for r in ours] == [r["crop_box"] for r in ref]
    assert [r["point_coords"] for r in ours] == [r["point_coords"] for r in ref]
    for a, b in zip(ref, ours, strict=True):
        assert set(b) == set(a)
        assert type(b["area"]) is int and type(b["bbox"][0]) is int
        ma, mb = _decode(a["segmentation"], mode), _decode(b["segmentation"], mode)
        assert mb.shape == ma.shape == IMAGE_HW
        assert (ma == mb).mean() >= 0.999
        assert abs(a["area"] - b["area"]) <= 1e-3 * ma.size
        # Gain 3 amplifies float32 rounding differences: IoU predictions of size ~10 differ by
        # ~1e-4 relative; a stability score moves by a few pixels of a count. NaN: empty mask.
        assert b["predicted_iou"] == pytest.approx(a["predicted_iou"], rel=1e-3, abs=1e-3)
        assert b["stability_score"] == pytest.approx(a["stability_score"], abs=2e-3, nan_ok=True)
        if mode != "binary_mask" and (ma == mb).all():
            assert b["segmentation"] == a["segmentation"]  # the same RLE, field for field


def test_generate_matches_official(models, image):
    """One crop, 16 x 16 points in batches of 48 (the last one padded): IoU and stability
    filters, box NMS (0.99: identical boxes go, many distinct ones stay)."""
    ts, sam = models
    kw = dict(
        points_per_side=16,
        points_per_batch=48,
        pred_iou_thresh=1.0,
        stability_score_thresh=0.3,
        box_nms_thresh=0.99,
    )
    ref = OfficialGenerator(ts, **kw).generate(image)
    ours = SamAutomaticMaskGenerator(sam, **kw).generate(image)
    assert len(ref) >= 10, "the settings should let a meaningful number of masks through"
    _compare(ref, ours, "binary_mask")


@pytest.mark.parametrize("mode", ["uncompressed_rle", "coco_rle"])
def test_crops_and_small_regions_match_official(models, image, mode):
    """crop_n_layers=1 (five crops, 16 x 16 and 8 x 8 points, the near-crop-edge filter, NMS
    across crops), min_mask_region_area (holes and islands, NMS again), the RLE output modes.
    No IoU or stability filter: few masks of a random model stay clear of the crops' inner
    edges. (The official's boxes turn float when some batch keeps no mask; the values equal.)"""
    ts, sam = models
    kw = dict(
        points_per_side=16,
        points_per_batch=64,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=0.99,
        crop_n_layers=1,
        crop_nms_thresh=0.9,
        crop_n_points_downscale_factor=2,
        min_mask_region_area=20,
        output_mode=mode,
    )
    ref = OfficialGenerator(ts, **kw).generate(image)
    ours = SamAutomaticMaskGenerator(sam, **kw).generate(image)
    assert len(ref) >= 5
    assert len({tuple(r["crop_box"]) for r in ref}) >= 3, "masks of the crops should survive"
    _compare(ref, ours, mode)


def test_point_grids_and_progress(models, image):
    """Explicit point_grids (exclusive with points_per_side) and the progress callback."""
    _, sam = models
    grid = np.array([[0.5, 0.5], [0.1, 0.9], [0.9, 0.2]])
    gen = SamAutomaticMaskGenerator(
        sam, points_per_side=None, point_grids=[grid], points_per_batch=2, pred_iou_thresh=0.0,
        stability_score_thresh=0.0, box_nms_thresh=1.0,
    )  # fmt: skip
    calls = []
    records = gen.generate(image, progress=calls.append)
    assert calls == [1, 1] and gen.num_batches(IMAGE_HW) == 2
    assert len(records) == 9  # 3 points x 3 masks, nothing filtered
    pts = {tuple(r["point_coords"][0]) for r in records}
    assert pts == {(80.0, 60.0), (16.0, 108.0), (144.0, 24.0)}


def test_argument_errors(models):
    _, sam = models
    with pytest.raises(ValueError, match="exactly one"):
        SamAutomaticMaskGenerator(sam, points_per_side=None)
    with pytest.raises(ValueError, match="exactly one"):
        SamAutomaticMaskGenerator(sam, point_grids=[amg.build_point_grid(2)])
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(sam, output_mode="png")
    with pytest.raises(ValueError, match="needs 2"):
        SamAutomaticMaskGenerator(
            sam, points_per_side=None, point_grids=[amg.build_point_grid(2)], crop_n_layers=1
        )


# ------------------------------------------------------------------------- mask utilities
def test_grids_and_crop_boxes():
    for n, layers, scale in [(32, 0, 1), (16, 2, 2), (5, 1, 1)]:
        ours = amg.build_all_layer_point_grids(n, layers, scale)
        ref = official.build_all_layer_point_grids(n, layers, scale)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(a, b)
    for hw in [(120, 160), (1500, 2000), (333, 91)]:
        for layers in (0, 1, 2):
            assert amg.generate_crop_boxes(hw, layers, 512 / 1500) == (
                official.generate_crop_boxes(hw, layers, 512 / 1500)
            )


def _random_masks(rng, n, h, w):
    masks = rng.rand(n, h, w) > 0.7
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2] = False
    masks[2, 3, 5] = True  # one pixel
    return masks


def test_boxes_rle_and_coco():
    rng = np.random.RandomState(0)
    masks = _random_masks(rng, 6, 13, 17)
    masks[3] = False
    masks[3, 2:9, 4:6] = True
    ref_boxes = official.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(amg.masks_to_boxes(masks), ref_boxes)
    ref_rles = official.mask_to_rle_pytorch(torch.from_numpy(masks))
    for m, ref in zip(masks, ref_rles, strict=True):
        rle = amg.mask_to_rle(m)
        assert rle == ref
        np.testing.assert_array_equal(amg.rle_to_mask(rle), official.rle_to_mask(ref))
        np.testing.assert_array_equal(amg.rle_to_mask(rle), m)
        assert amg.area_from_rle(rle) == official.area_from_rle(ref) == m.sum()
        assert amg.coco_encode_rle(m) == official.coco_encode_rle(ref)
    assert amg.box_xyxy_to_xywh(np.array([3, 4, 10, 8])) == [3, 4, 7, 4]


def test_box_near_crop_edge():
    rng = np.random.RandomState(1)
    boxes = rng.randint(0, 120, (50, 4))
    boxes[:, 2:] += boxes[:, :2]
    for crop in ([0, 0, 200, 150], [40, 30, 160, 150], [0, 50, 100, 150]):
        ref = official.is_box_near_crop_edge(torch.from_numpy(boxes), crop, [0, 0, 200, 150])
        np.testing.assert_array_equal(
            amg.is_box_near_crop_edge(boxes, crop, [0, 0, 200, 150]), ref.numpy()
        )


@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.7, 0.95])
def test_nms_matches_reference(thresh):
    """Random integer boxes with many duplicates, equal scores and zero-area boxes."""
    from torchvision.ops.boxes import batched_nms  # the stub's torch kernel

    rng = np.random.RandomState(int(thresh * 100))
    xy = rng.randint(0, 30, (300, 2))
    wh = rng.randint(0, 12, (300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[100:150] = boxes[:50]
    scores = rng.randint(0, 8, 300).astype(np.float32) / 8
    ref = batched_nms(
        torch.from_numpy(boxes).float(), torch.from_numpy(scores), torch.zeros(300), thresh
    )
    np.testing.assert_array_equal(amg.nms(boxes, scores, thresh), ref.numpy())
    assert amg.nms(np.zeros((0, 4)), np.zeros(0), thresh).shape == (0,)


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_matches_opencv(mode):
    """scipy's 8-connected labels give OpenCV's result (the official uses cv2), including the
    'every island small: keep the largest' case and diagonal-only connections."""
    rng = np.random.RandomState(2)
    masks = [rng.rand(40, 50) > p for p in (0.3, 0.5, 0.7, 0.9, 0.97)]
    diag = np.zeros((9, 9), bool)
    diag[np.arange(9), np.arange(9)] = True  # one 8-connected line, 9 4-connected pieces
    masks += [diag, ~diag, np.zeros((6, 6), bool), np.ones((6, 6), bool)]
    for m in masks:
        for area in (1, 3, 10, 60):
            ref_mask, ref_changed = official.remove_small_regions(m, area, mode)
            mask, changed = amg.remove_small_regions(m, area, mode)
            assert changed == ref_changed
            np.testing.assert_array_equal(mask, ref_mask)
    assert cv2.__version__  # the reference really ran OpenCV


@pytest.mark.parametrize(
    "input_hw,crop_hw", [((96, 128), (96, 128)), ((96, 128), (120, 160)), ((128, 43), (301, 100))]
)
def test_upscale_masks_is_postprocess_masks(input_hw, crop_hw):
    """The banded composition equals SAM's two resizes (upsample, crop, resize) up to float32
    rounding, for equal, larger and odd sizes."""
    from samref_jax.sam.automatic_mask_generator import upscale_masks
    from samref_jax.sam.transforms import postprocess_masks

    cfg = sam_config("tiny")
    low = jnp.asarray(np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32) * 10)
    want = postprocess_masks(low, input_hw, crop_hw, cfg)
    got = jax.jit(upscale_masks, static_argnums=(1, 2, 3))(low, input_hw, crop_hw, cfg)
    assert got.shape == want.shape == (2, 3, *crop_hw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
