"""Automatic mask generation: our `SamAutomaticMaskGenerator.generate` vs the official one, same
process, same image, same (random) weights.

    python benchmarks/amg_latency.py [--configs tiny,tiny-crops,vit_b] [--runs 3]

Configs (one row each):

  * ``tiny``: the parity test's setting (tests/sam/test_amg.py): the tiny SAM with weights at
    `randomize_` gain 3, a 120x160 image, 16 x 16 points in batches of 48, pred_iou_thresh 1,
    stability_score_thresh 0.3, box_nms_thresh 0.99 (tens of masks survive).
  * ``tiny-crops``: the same model with crop_n_layers=1 (five crops), 480x640 image.
  * ``vit_b``: vit_b-shaped SAM, every weight random (gain 1), a 480x640 image, the official
    defaults (32 x 32 points, batches of 64). Random weights give junk scores, so few masks
    pass the filters: this row times the model and postprocessing, not mask bookkeeping.

Each side runs once untimed (JAX: compile + run, reported as "first call"), then `--runs`
rounds that time one call of each side in turn (alternating, so that load from other processes
falls on both). Prints a markdown table with medians and minima and ours/official (lower is
better for ours). Needs the `test` extra (torch, segment-anything).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import host_setup, machine_line, median_time, table

CONFIGS = {
    "tiny": dict(
        model="tiny",
        gain=3.0,
        seed=3,
        image_hw=(120, 160),
        kwargs=dict(
            points_per_side=16,
            points_per_batch=48,
            pred_iou_thresh=1.0,
            stability_score_thresh=0.3,
            box_nms_thresh=0.99,
        ),
    ),
    "tiny-crops": dict(
        model="tiny",
        gain=3.0,
        seed=3,
        image_hw=(480, 640),
        kwargs=dict(
            points_per_side=16,
            points_per_batch=64,
            pred_iou_thresh=1.0,
            stability_score_thresh=0.3,
            box_nms_thresh=0.99,
            crop_n_layers=1,
        ),
    ),
    "vit_b": dict(model="vit_b", gain=1.0, seed=0, image_hw=(480, 640), kwargs={}),
}


def _image(hw: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field (blocks of 16 px, bilinear-upsampled), HxWx3 uint8."""
    from PIL import Image

    rng = np.random.RandomState(0)
    small = rng.randint(0, 255, (hw[0] // 16 + 1, hw[1] // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((hw[1], hw[0]), Image.BILINEAR))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,tiny-crops,vit_b", help="comma-separated rows")
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (one call per side each)")
    args = ap.parse_args()
    host_setup()

    import jax
    import jax.numpy as jnp
    import torch

    from samref_jax.sam.automatic_mask_generator import SamAutomaticMaskGenerator
    from samref_jax.sam.build import SamModel
    from samref_jax.sam.config import sam_config
    from samref_jax.sam.convert import convert_state_dict
    from tests.sam_reference import build_torch_sam, randomize_, segment_anything, state_dict_numpy

    rows = []
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        cfg = sam_config(spec["model"])
        ts = randomize_(build_torch_sam(cfg), spec["seed"], spec["gain"]).requires_grad_(False)
        _, params = convert_state_dict(state_dict_numpy(ts), config=cfg)
        sam = SamModel(cfg, jax.tree_util.tree_map(jnp.asarray, params))
        image = _image(spec["image_hw"])
        official = segment_anything.SamAutomaticMaskGenerator(ts, **spec["kwargs"])
        ours = SamAutomaticMaskGenerator(sam, **spec["kwargs"])

        t0 = time.perf_counter()
        ref = official.generate(image)
        official_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = ours.generate(image)
        ours_first = time.perf_counter() - t0
        # Alternating rounds, so that load from other processes hits both sides alike.
        times = {"official": [], "ours": []}
        for _ in range(args.runs):
            for side, gen in (("official", official), ("ours", ours)):
                times[side].append(
                    median_time(lambda g=gen, x=image: g.generate(x), 1, warmup=0)[0]
                )
        t_official, t_ours = (statistics.median(times[k]) for k in ("official", "ours"))
        m_official, m_ours = (min(times[k]) for k in ("official", "ours"))
        crops = len(ours.crop_boxes(image.shape[:2])[0])
        rows.append(
            [
                f"{name}: {cfg.name} {image.shape[0]}x{image.shape[1]}, "
                f"{ours.num_batches(image.shape[:2])} batches, {crops} crop(s)",
                f"{len(ref)} / {len(got)}",
                f"{official_first:.2f} s / {ours_first:.2f} s",
                f"{t_official:.2f} s ({m_official:.2f} s)",
                f"{t_ours:.2f} s ({m_ours:.2f} s)",
                f"**{t_ours / t_official:.2f}** ({m_ours / m_official:.2f})",
            ]
        )
        print(rows[-1], flush=True)
    print(machine_line(), f"torch_threads={torch.get_num_threads()}")
    headers = [
        "config",
        "masks official / ours",
        "first call official / ours",
        "official: median (min)",
        "ours: median (min)",
        "ours/official: medians (mins)",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
