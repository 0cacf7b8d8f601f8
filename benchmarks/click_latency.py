"""Per-click latency of SAM-REF's modes on the vit_b frame, with a cached image embedding.

    python benchmarks/click_latency.py [--clicks 20] [--model-type vit_b]

For `sam`, `global` and `full`: median wall time of one jitted click step (prompt encoder, mask
decoder, upscaling, refiners; embedding, SAM's dense positional encoding, GlobalDiff's
per-image inputs and the decoder's per-image first-layer products cached, as in
`SamRefPredictor`; random weights), the modes interleaved click
by click so that each sees the same machine conditions. Also the JAX SAM decoder
against the official torch decoder on the same embedding (same process), and each refiner's
parameter count and FLOPs per click from XLA's cost analysis. Prints markdown tables.
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import host_setup, machine_line, median_time, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--model-type", default="vit_b")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch decoder comparison")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc settings (default: samref_jax.host.tune_malloc, for both sides)",
    )
    ap.add_argument(
        "--single-arena", action="store_true", help="host.py's single-arena setting as well"
    )
    args = ap.parse_args()
    host_setup(args.default_malloc, args.single_arena)

    import time

    import jax
    import jax.numpy as jnp
    import ml_collections

    from samref_jax.refiners.global_diff import GlobalDiff
    from samref_jax.refiners.patch_diff import PatchDiff
    from samref_jax.samref.config import MODES, sam_config_from, samref_model_config
    from samref_jax.samref.model import ClickState, ImageContext, SamRef, init_samref_params

    cfg = samref_model_config(args.model_type)
    params = init_samref_params(cfg, jax.random.key(0, impl="rbg"))
    model = SamRef(ml_collections.FrozenConfigDict(cfg))
    sc = sam_config_from(cfg)
    f, s, d = sc.img_size, sc.image_embedding_size, sc.prompt_embed_dim
    rng = np.random.RandomState(0)
    n = int(cfg.max_clicks)
    # As SamRefPredictor does: SAM's dense positional encoding computed once, not per click,
    # and GlobalDiff's per-image inputs once per image.
    image_pe = jax.jit(lambda p: model.apply({"params": p}, method=SamRef.dense_pe))(params)
    x = ImageContext(
        embedding=jnp.asarray(rng.randn(1, s, s, d).astype(np.float32)),
        image=jnp.asarray(rng.randn(1, f, f, 3).astype(np.float32)),
        valid_hw=jnp.asarray([[768, 1024]], jnp.int32),
        radius=jnp.full((1,), 8.0),
        image_pe=image_pe,
    )
    context_fn = jax.jit(
        lambda p, i, e: model.apply({"params": p}, i, e, method=SamRef.global_context)
    )
    x = x._replace(global_context=context_fn(params, x.image, x.embedding))
    # ... and the per-image part of SAM's decoder's first layer, once per image.
    layer0_fn = jax.jit(
        lambda p, e, pe: model.apply({"params": p}, e, pe, method=SamRef.decoder_layer0)
    )
    x = x._replace(decoder_layer0=layer0_fn(params, x.embedding, image_pe))
    ca = context_fn.lower(params, x.image, x.embedding).compile().cost_analysis()
    context_flops = float((ca[0] if isinstance(ca, list) else ca).get("flops", float("nan")))
    coords = rng.uniform(100, 700, (n, 2)).astype(np.float32)
    labels = (rng.rand(n) > 0.3).astype(np.int32)
    labels[0] = 1

    empty = ClickState.empty(cfg)

    def inputs(k: int, prev):
        # The clicks so far on the state the previous click returned (its feedback).
        return (empty if prev is None else prev[1]).with_clicks(coords[:k], labels[:k])

    # Modes are interleaved click by click (each with its own chain of previous outputs), so
    # that every mode sees the same machine conditions; the ratios are of medians.
    steps, flops, prev, times = {}, {}, {}, {m: [] for m in MODES}
    for mode in MODES:
        steps[mode] = jax.jit(
            lambda p, c, st, mode=mode: model.apply({"params": p}, c, st, mode, method=SamRef.click)
        )
        ca = steps[mode].lower(params, x, empty).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        flops[mode] = float(ca.get("flops", float("nan")))
        first = jax.block_until_ready(steps[mode](params, x, inputs(1, None)))
        jax.block_until_ready(steps[mode](params, x, inputs(2, first)))  # warm: both kinds
        prev[mode] = None
    for k in range(1, args.clicks + 1):
        for mode in MODES:
            xi = inputs(k, prev[mode])
            t = time.perf_counter()
            prev[mode] = jax.block_until_ready(steps[mode](params, x, xi))
            times[mode].append(time.perf_counter() - t)
    medians = {m: float(np.median(t)) for m, t in times.items()}
    rows = [
        [
            mode,
            f"{medians[mode] * 1e3:.1f} ms",
            f"{medians[mode] / medians['sam']:.2f}",
            f"{flops[mode] / 1e9:.2f}",
        ]
        for mode in MODES
    ]
    print(machine_line())
    print(f"{args.clicks} clicks per mode (modes interleaved), frame {f}, cached embedding")
    print(table(["mode", "median per click", "x sam", "GFLOPs/click (XLA)"], rows))

    count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(t))
    ref_rows = []
    for name, mod_cls, extra in (
        ("GlobalDiff", GlobalDiff, flops["global"] - flops["sam"]),
        ("PatchDiff", PatchDiff, flops["full"] - flops["global"]),
    ):
        key = "global_diff" if mod_cls is GlobalDiff else "patch_diff"
        ref_rows.append([name, f"{count(params[key]):,}", f"{extra / 1e9:.2f}"])
    ref_rows.append(
        [
            "SAM prompt encoder + mask decoder",
            f"{count(params['sam']['prompt_encoder']) + count(params['sam']['mask_decoder']):,}",
            f"{flops['sam'] / 1e9:.2f}",
        ]
    )
    print(table(["part", "parameters", "GFLOPs/click"], ref_rows))
    print(
        "GlobalDiff per-image inputs (once per image, not per click):",
        f"{context_flops / 1e9:.3f} GFLOPs",
    )

    if not args.no_torch:
        import torch

        from samref_jax.sam.config import sam_config
        from samref_jax.sam.convert import convert_state_dict
        from samref_jax.sam.model import Sam
        from tests.sam_reference import random_torch_sam, state_dict_numpy

        ts = random_torch_sam(sam_config(args.model_type))
        _, sp = convert_state_dict(state_dict_numpy(ts))
        sp = jax.tree_util.tree_map(jnp.asarray, sp)
        emb = rng.randn(1, s, s, 256).astype(np.float32)
        emb_t = torch.from_numpy(emb.transpose(0, 3, 1, 2).copy())
        pts = torch.from_numpy(coords[None, :3]), torch.from_numpy(labels[None, :3])
        mask_t = torch.zeros(1, 1, 256, 256)

        def torch_dec():
            with torch.no_grad():
                sp_, de_ = ts.prompt_encoder(pts, None, mask_t)
                return ts.mask_decoder(emb_t, ts.prompt_encoder.get_dense_pe(), sp_, de_, False)

        sam_mod = Sam(sam_config(args.model_type))
        c = np.zeros((1, 8, 2), np.float32)
        lab = np.full((1, 8), -1, np.int32)
        c[0, :3], lab[0, :3] = coords[:3], labels[:3]
        dec = jax.jit(
            lambda p, e, c, lb, m, h, pe: sam_mod.apply(
                {"params": p}, e, c, lb, m, h, pe, method=Sam.predict_masks
            )
        )
        args_j = (
            sp,
            jnp.asarray(emb),
            jnp.asarray(c),
            jnp.asarray(lab),
            jnp.zeros((1, 256, 256)),
            jnp.ones((1,), bool),
        )
        pe = jax.jit(lambda p: sam_mod.apply({"params": p}, method=Sam.dense_pe))(sp)
        t_t, _ = median_time(torch_dec, args.clicks, warmup=2)
        t_j, _ = median_time(
            lambda: jax.block_until_ready(dec(*args_j, None)), args.clicks, warmup=2
        )
        t_c, _ = median_time(lambda: jax.block_until_ready(dec(*args_j, pe)), args.clicks, warmup=2)
        rows = [
            ["prompt encoder + mask decoder", f"{t_t * 1e3:.1f} ms", f"{t_j * 1e3:.1f} ms"],
            ["same, positional encoding cached (our predictors)", "", f"{t_c * 1e3:.1f} ms"],
        ]
        for row, t in zip(rows, (t_j, t_c), strict=True):
            row.append(f"{t / t_t:.2f}")
        print(
            table(
                ["SAM decoder, 3 points + mask input (median)", "torch", "JAX", "JAX/torch"], rows
            )
        )


if __name__ == "__main__":
    main()
