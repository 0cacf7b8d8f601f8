"""SAM port vs the official PyTorch SAM, same process, same input, same (random) weights.

    python benchmarks/sam_latency.py [--model-type vit_b] [--runs 3] [--decoder-runs 20]

Times the image-encoder forward (fp32, 1024x1024) and one prompt-encoder + mask-decoder call
on a cached embedding (one point, multimask, official `SamPredictor.predict` vs ours, which
includes postprocessing to the original size in both). Prints a markdown table with the
JAX/torch wall-time ratio (lower is better for JAX). Needs the `test` extra (torch).
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import machine_line, median_time, official_sam, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model-type", default="vit_b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decoder-runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from samref_jax.sam.build import SamModel
    from samref_jax.sam.config import sam_config
    from samref_jax.sam.convert import convert_state_dict
    from samref_jax.sam.predictor import SamPredictor, _embed
    from tests.sam_reference import segment_anything, state_dict_numpy

    if args.threads:
        torch.set_num_threads(args.threads)
    ts = official_sam(args.model_type)
    _, params = convert_state_dict(state_dict_numpy(ts))
    model = SamModel(sam_config(args.model_type), jax.tree_util.tree_map(jnp.asarray, params))
    rng = np.random.RandomState(0)
    x = rng.randn(1, 1024, 1024, 3).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def torch_enc():
        with torch.no_grad():
            return ts.image_encoder(xt)

    xj = jnp.asarray(x)
    import time

    t0 = time.perf_counter()
    jax.block_until_ready(_embed(model.module, model.params, xj))
    compile_s = time.perf_counter() - t0
    jax_enc = lambda: jax.block_until_ready(_embed(model.module, model.params, xj))
    t_torch, _ = median_time(torch_enc, args.runs)
    t_jax, _ = median_time(jax_enc, args.runs, warmup=0)

    image = rng.randint(0, 255, (480, 640, 3), dtype=np.uint8)
    official = segment_anything.SamPredictor(ts)
    official.set_image(image)
    ours = SamPredictor(model)
    ours.set_image(image)
    pt = dict(point_coords=np.array([[320, 240]]), point_labels=np.array([1]))
    d_torch, _ = median_time(lambda: official.predict(**pt), args.decoder_runs, warmup=2)
    d_jax, _ = median_time(lambda: ours.predict(**pt), args.decoder_runs, warmup=2)

    rows = [
        [
            f"{args.model_type} image encoder fp32 (1x1024x1024)",
            f"{t_torch:.2f} s",
            f"{t_jax:.2f} s",
            f"{t_jax / t_torch:.2f}",
        ],
        [
            "prompt encoder + mask decoder + postprocess (1 point)",
            f"{d_torch * 1e3:.1f} ms",
            f"{d_jax * 1e3:.1f} ms",
            f"{d_jax / d_torch:.2f}",
        ],
    ]
    print(machine_line(), f"torch_threads={torch.get_num_threads()}")
    print(f"JAX encoder compile: {compile_s:.1f} s (not in the medians)")
    print(table(["what (median)", "torch (official)", "JAX (ours)", "JAX/torch"], rows))


if __name__ == "__main__":
    main()
