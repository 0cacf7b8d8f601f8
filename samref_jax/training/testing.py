"""Small configs and synthetic batches for training tests (fast to compile on a CPU)."""

from __future__ import annotations

import ml_collections
import numpy as np

from samref_jax.training.config import base_config


def tiny_test_config(
    mode: str = "full", frame: int = 64, rounds: int = 2
) -> ml_collections.ConfigDict:
    """A minimal SAM-REF (64 frame, tiny SAM, narrow refiners), everything trainable."""
    c = base_config("tiny")
    c.mode = mode
    m = c.model
    m.sam_overrides = dict(img_size=frame, encoder_depth=1, encoder_global_attn_indexes=(0,))
    m.multimask_first_click = False
    m.max_clicks = max(4, rounds)
    for r in (m.refiners.global_diff, m.refiners.patch_diff):
        r.width = 8
        r.blocks_before = 1
        r.blocks_after = 0
    m.refiners.patch_diff.patch_size = 16
    m.refiners.patch_diff.embed_patch_size = 4
    c.train.trainable = ("sam", "global_diff", "patch_diff")
    c.train.rounds = rounds
    c.train.lr = 3e-3
    c.train.warmup_steps = 2
    c.train.num_steps = 100
    c.data.per_device_batch_size = 2
    c.loss.round_weights = (1.0,)
    return c


def synthetic_batch(
    n: int, frame: int = 64, seed: int = 0, detail_scale: int = 1
) -> dict[str, np.ndarray]:
    """``n`` training examples: textured ellipses on noise (the pipeline's example format);
    ``detail_scale`` k > 1 adds ``detail_image`` (n, kF, kF, 3) (PatchDiff's ``image_scale``)."""
    if detail_scale > 1:
        k = int(detail_scale)
        big = synthetic_batch(n, frame * k, seed)
        return {
            "image": np.ascontiguousarray(big["image"][:, k // 2 :: k, k // 2 :: k]),
            "gt": np.ascontiguousarray(big["gt"][:, k // 2 :: k, k // 2 :: k]),
            "valid_hw": np.full((n, 2), frame, np.int32),
            "first_click": big["first_click"] // k,
            "radius": big["radius"] / k,
            "detail_image": big["image"],
        }
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:frame, :frame]
    images, gts, clicks = [], [], []
    for _ in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * frame
        ry, rx = rng.uniform(0.12, 0.3, 2) * frame
        obj = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        bg = rng.integers(0, 120, (frame, frame, 3))
        fg = np.array(rng.integers(120, 256, 3))[None, None] + rng.integers(
            -20, 20, (frame, frame, 3)
        )
        img = np.where(obj[..., None], fg, bg).clip(0, 255).astype(np.uint8)
        images.append(img)
        gts.append(obj.astype(np.int8))
        clicks.append([int(cy), int(cx)])
    return {
        "image": np.stack(images),
        "gt": np.stack(gts),
        "valid_hw": np.full((n, 2), frame, np.int32),
        "first_click": np.asarray(clicks, np.int32),
        "radius": np.full((n,), 2.0, np.float32),
    }


def write_fake_coco_mval(root, n: int = 6, size: tuple[int, int] = (72, 96), seed: int = 0):
    """A tiny folder in the COCO_MVal layout (img/*.jpg, gt/*.png) for pipeline tests."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(parents=True, exist_ok=True)
    b = synthetic_batch(n, frame=max(size), seed=seed)
    for i in range(n):
        img = b["image"][i][: size[0], : size[1]]
        gt = b["gt"][i][: size[0], : size[1]]
        Image.fromarray(img).save(root / "img" / f"obj{i:02d}_{i:06d}.jpg", quality=95)
        Image.fromarray((gt > 0).astype(np.uint8) * 255).save(
            root / "gt" / f"obj{i:02d}_{i:06d}.png"
        )
    return root
