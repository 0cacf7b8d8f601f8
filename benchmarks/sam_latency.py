"""SAM port vs the official PyTorch SAM, same process, same input, same (random) weights.

    python benchmarks/sam_latency.py [--model-type vit_b] [--runs 3] [--decoder-runs 20]

Times the image-encoder forward (fp32, 1024x1024) and one prompt-encoder + mask-decoder call
on a cached embedding (one point, multimask, official `SamPredictor.predict` vs ours, which
includes postprocessing to the original size in both), plus one fp32 GEMM of the encoder's
MLP shape as a reference for the matmul speed each side reaches. Prints a markdown table with
the JAX/torch wall-time ratio (lower is better for JAX). Needs the `test` extra (torch).

With ``--torch-device cuda`` (JAX then runs on its default backend, a GPU when one is present)
the torch side runs on the GPU with TF32 off, and the table adds the largest embedding
difference between the two at JAX's default matmul precision (TF32 on NVIDIA) and at
``"highest"`` (true float32; docs/design.md, 'SAM numerics'). The timed JAX encoder runs at
the default precision, so on NVIDIA GPUs its ratio compares TF32 (JAX) with true float32
(torch).
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import host_setup, machine_line, median_time, official_sam, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model-type", default="vit_b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decoder-runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--torch-device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--parity", action="store_true", help="add embedding differences (always on with cuda)"
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc settings (default: samref_jax.host.tune_malloc, for both sides)",
    )
    args = ap.parse_args()
    host_setup(args.default_malloc)

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
    _, params = convert_state_dict(state_dict_numpy(ts), config=sam_config(args.model_type))
    dev = torch.device(args.torch_device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ts = ts.to(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = SamModel(sam_config(args.model_type), jax.tree_util.tree_map(jnp.asarray, params))
    rng = np.random.RandomState(0)
    f = sam_config(args.model_type).img_size
    x = rng.randn(1, f, f, 3).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)

    def torch_enc():
        with torch.no_grad():
            out = ts.image_encoder(xt)
        sync()
        return out

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
    d_torch, _ = median_time(lambda: (official.predict(**pt), sync()), args.decoder_runs, warmup=2)
    d_jax, _ = median_time(lambda: ours.predict(**pt), args.decoder_runs, warmup=2)

    # The encoder's MLP matmul shape (tokens x width @ width x 4*width): the GEMM speed both
    # sides reach bounds the encoder ratio, since ~3/4 of its FLOPs are such dense layers.
    cfg = sam_config(args.model_type)
    m, k, n = cfg.image_embedding_size**2, cfg.encoder_embed_dim, 4 * cfg.encoder_embed_dim
    a, b = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
    at, bt = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
    aj, bj = jnp.asarray(a), jnp.asarray(b)
    gemm = jax.jit(jnp.matmul)

    def torch_gemm():
        with torch.no_grad():
            out = at @ bt
        sync()
        return out

    g_torch, _ = median_time(torch_gemm, args.decoder_runs, warmup=2)
    g_jax, _ = median_time(lambda: gemm(aj, bj).block_until_ready(), args.decoder_runs, warmup=2)
    gflop = 2 * m * k * n / 1e9

    rows = [
        [
            f"{args.model_type} image encoder fp32 (1x{f}x{f})"
            + (" (JAX: TF32 matmuls)" if cuda and jax.default_backend() == "gpu" else ""),
            f"{t_torch:.2f} s" if t_torch >= 1 else f"{t_torch * 1e3:.1f} ms",
            f"{t_jax:.2f} s" if t_jax >= 1 else f"{t_jax * 1e3:.1f} ms",
            f"{t_jax / t_torch:.2f}",
        ],
        [
            "prompt encoder + mask decoder + postprocess (1 point)",
            f"{d_torch * 1e3:.1f} ms",
            f"{d_jax * 1e3:.1f} ms",
            f"{d_jax / d_torch:.2f}",
        ],
        [
            f"reference: one fp32 GEMM {m}x{k} @ {k}x{n} (GFLOP/s in brackets)",
            f"{g_torch * 1e3:.1f} ms ({gflop / g_torch:.0f})",
            f"{g_jax * 1e3:.1f} ms ({gflop / g_jax:.0f})",
            f"{g_jax / g_torch:.2f}",
        ],
    ]
    if cuda or args.parity:
        ref = torch_enc().cpu().numpy().transpose(0, 2, 3, 1)
        for prec in ("default", "highest"):
            with jax.default_matmul_precision(prec):
                emb = np.asarray(jax.jit(lambda p, x: _embed(model.module, p, x))(model.params, xj))
            rows.append(
                [
                    f"embedding max abs diff vs torch, JAX matmul precision {prec!r}",
                    "-",
                    f"{np.abs(emb - ref).max():.2e}",
                    "-",
                ]
            )
    if cuda:
        print(f"torch device: {torch.cuda.get_device_name()} (TF32 off), torch {torch.__version__}")
    print(machine_line(), f"torch_threads={torch.get_num_threads()}")
    print(f"JAX encoder compile: {compile_s:.1f} s (not in the medians)")
    print(table(["what (median)", "torch (official)", "JAX (ours)", "JAX/torch"], rows))


if __name__ == "__main__":
    main()
