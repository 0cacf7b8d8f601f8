"""Accelerator benchmark suite: one command, whatever backend is present (CPU, GPU, TPU).

    python benchmarks/accelerator.py            # vit_b sizes (a few minutes on one GPU)
    python benchmarks/accelerator.py --smoke    # tiny model and frame (CPU, well under a minute)

Measures, with random weights, and prints markdown tables:

* the vit_b image encoder (1024 frame, batch 1): latency in float32 and bfloat16 compute;
* one click of SAM-REF in ``sam`` and ``full`` mode (cached embedding; prompt encoder, mask
  decoder, refiners, paste-back): median latency over ``--clicks`` clicks;
* the training step of the vit_b recipe (``configs/samref_vit_b.py``: frozen image encoder, T
  unrolled click rounds, its dtype and per-device batch) on a ``('data',)`` mesh of every
  device: images/s and clicks/s (images x rounds), and model FLOPs utilisation = XLA's
  ``cost_analysis()['flops']`` of the step lowered for the CPU backend (see ``cpu_flops``) /
  devices / step time / the device's peak (the table ``PEAK_FLOPS``: dense bf16, from the
  vendors' data sheets).

``--smoke`` swaps in the tiny test model (64 frame, 2 rounds; the train step in ``sam`` mode,
whose compile is the cheapest) so the same code runs on a CPU.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import device_median, fmt_flops, fmt_time  # noqa: E402

# Dense bf16 peak FLOP/s per device (vendor data sheets; without sparsity).
PEAK_FLOPS: dict[str, float] = {
    "NVIDIA H100 SXM": 989.4e12,
    "NVIDIA H100 PCIe": 756.0e12,
    "NVIDIA H100 NVL": 835.0e12,
    "NVIDIA H200": 989.4e12,
    "NVIDIA A100": 312.0e12,
    "NVIDIA L4": 121.0e12,
    "TPU v4": 275.0e12,
    "TPU v5e": 197.0e12,
    "TPU v5p": 459.0e12,
    "TPU v6e": 918.0e12,
}


def peak_key(device_kind: str) -> str | None:
    """Row of ``PEAK_FLOPS`` for a ``jax.Device.device_kind`` (None: unknown, e.g. a CPU)."""
    k = device_kind.lower()
    if "h100" in k:
        if "pcie" in k:
            return "NVIDIA H100 PCIe"
        return "NVIDIA H100 NVL" if "nvl" in k else "NVIDIA H100 SXM"
    if "h200" in k:
        return "NVIDIA H200"
    if "a100" in k:
        return "NVIDIA A100"
    if re.search(r"\bl4\b", k):
        return "NVIDIA L4"
    if "tpu" in k:
        if "v6" in k:
            return "TPU v6e"
        if "v5" in k:
            return "TPU v5e" if ("lite" in k or "v5e" in k) else "TPU v5p"
        if "v4" in k:
            return "TPU v4"
    return None


def _flops(lowered) -> float:
    """XLA's FLOP count of the unoptimised HLO of a ``jax.stages.Lowered``."""
    ca = lowered.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return float((ca or {}).get("flops", float("nan")))


def _on_cpu(tree, sharding=None):
    """Abstract copies (ShapeDtypeStruct) of the arrays in ``tree``, placed on the CPU."""
    import jax

    sh = sharding or jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree
    )


def cpu_flops(fn, *args) -> float:
    """Model FLOPs of ``fn(*args)``: XLA's cost analysis of the program lowered for the CPU.

    Counted on the CPU backend (nothing is compiled or run there) so that every backend reports
    the same number: on GPU, XLA's analysis of the compiled program misses the matmuls and
    convolutions it hands to cuBLAS/cuDNN (an H200 reported 34 GFLOP for the fp32 vit_b
    encoder instead of 988), and the lowered program's analysis is empty there.
    """
    import jax

    return _flops(jax.jit(fn).lower(*_on_cpu(args)))


def _configs(smoke: bool):
    """(training config, encoder SamConfig) of the run."""
    from samref_jax.samref.config import sam_config_from

    if smoke:
        from samref_jax.training.testing import tiny_test_config

        tc = tiny_test_config("full", 64, rounds=2)
        tc.train.trainable = ("sam/mask_decoder", "global_diff", "patch_diff")
        tc.data.per_device_batch_size = 1
        tc.mode = "sam"  # the train step's backward through the refiners compiles slowly on CPU
        return tc, sam_config_from(tc.model)
    try:
        from configs.samref_vit_b import get_config

        tc = get_config()
    except ImportError:  # the recipe's defaults
        from samref_jax.training.config import base_config

        tc = base_config("vit_b")
    tc.train.init_checkpoint = ""
    from samref_jax.sam.config import sam_config

    return tc, sam_config("vit_b")


def bench_encoder(sam_cfg, runs: int) -> list[list[str]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from samref_jax.sam.model import Sam, init_sam_params

    params = jax.jit(lambda k: init_sam_params(sam_cfg, k))(jax.random.key(0, impl="rbg"))
    f = sam_cfg.img_size
    x = jnp.asarray(np.random.RandomState(0).randn(1, f, f, 3).astype(np.float32))
    rows, base = [], None
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        model = Sam(sam_cfg, dtype=dtype)
        raw = lambda p, x, m=model: m.apply({"params": p}, x, method=Sam.embed_image)
        compiled = jax.jit(raw).lower(params, x).compile()
        t, _ = device_median(lambda c=compiled: c(params, x), runs)
        base = base or t
        rows.append(
            [
                f"image encoder {sam_cfg.name} {f}x{f}, batch 1, {name}",
                fmt_time(t),
                f"{base / t:.2f}x vs float32",
                fmt_flops(cpu_flops(raw, params, x)),
            ]
        )
    return rows


def bench_clicks(model_cfg, params, clicks: int) -> list[list[str]]:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from samref_jax.samref.config import sam_config_from
    from samref_jax.samref.model import ClickState, ImageContext, SamRef

    sc = sam_config_from(model_cfg)
    model = SamRef(ml_collections.FrozenConfigDict(model_cfg))
    f, s = sc.img_size, sc.image_embedding_size
    n = int(model_cfg.max_clicks)
    rng = np.random.RandomState(0)
    ctx = ImageContext(
        embedding=jnp.asarray(rng.randn(1, s, s, sc.prompt_embed_dim).astype(np.float32)),
        image=jnp.asarray(rng.randn(1, f, f, 3).astype(np.float32)),
        valid_hw=jnp.asarray([[f * 3 // 4, f]], jnp.int32),
        radius=jnp.full((1,), 5.0 * f / 1024),
    )
    coords = rng.uniform(0.1 * f, 0.7 * f, (n, 2)).astype(np.float32)
    labels = (rng.rand(n) > 0.3).astype(np.int32)
    labels[0] = 1
    rows, base = [], None
    for mode in ("sam", "full"):

        def raw(p, x, mode=mode):
            return model.apply({"params": p}, ctx, x, mode, method=SamRef.click)

        x0 = ClickState.empty(model_cfg).with_clicks(coords[:1], labels[:1])
        compiled = jax.jit(raw).lower(params, x0).compile()
        jax.block_until_ready(compiled(params, x0))
        times, state = [], ClickState.empty(model_cfg)
        for k in range(1, clicks + 1):
            kk = min(k, n)
            xi = state.with_clicks(coords[:kk], labels[:kk])
            t = time.perf_counter()
            _, state = jax.block_until_ready(compiled(params, xi))
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        base = base or med
        rows.append(
            [
                f"one click, mode {mode} (cached embedding, median of {clicks})",
                fmt_time(med),
                f"{med / base:.2f}x sam",
                fmt_flops(cpu_flops(raw, params, x0)),
            ]
        )
    return rows


def flop_count_config(config):
    """A copy of a training config to count model FLOPs with: the rounds unrolled (XLA's cost
    analysis counts a loop body once, whatever its trip count) and ``train.remat``'s
    recomputation left out."""
    config = config.copy_and_resolve_references()
    config.train.scan_unroll = True
    config.train.remat = False
    return config


def train_step_flops(config, state, batch) -> float:
    """Model FLOPs of one global training step (all devices together), counted on the CPU with
    :func:`flop_count_config`."""
    import jax

    from samref_jax.training import step as S

    config = flop_count_config(config)
    cpu_mesh = S.make_mesh(jax.devices("cpu")[:1])
    fn = S.make_train_step(config, cpu_mesh, state.params, donate=False)
    return _flops(
        fn.lower(_on_cpu(state, S.replicated(cpu_mesh)), _on_cpu(batch, S.batch_sharding(cpu_mesh)))
    )


def bench_train_step(config, params, steps: int) -> tuple[list[list[str]], dict]:
    import jax
    import numpy as np

    from samref_jax.samref.config import sam_config_from
    from samref_jax.samref.model import detail_scale
    from samref_jax.training import step as S
    from samref_jax.training.testing import synthetic_batch

    mesh = S.make_mesh()
    ndev = jax.device_count()
    gb = int(config.data.per_device_batch_size) * ndev
    T = int(config.train.rounds)
    frame = sam_config_from(config.model).img_size
    state = S.put_replicated(S.create_state(config, params, 0), mesh)
    step_fn = S.make_train_step(config, mesh, params)
    k = detail_scale(config.model)  # the recipe's PatchDiff image scale
    batch = S.shard_batch(synthetic_batch(gb, frame, seed=0, detail_scale=k), mesh)
    del params
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = train_step_flops(config, state, batch) / ndev  # per device
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    kind = jax.devices()[0].device_kind
    key = peak_key(kind)
    peak = PEAK_FLOPS.get(key) if key else None
    mfu = flops / dt / peak if peak and np.isfinite(flops) else None
    trainable = ",".join(S.effective_trainable(config))
    desc = (
        f"train step: {config.mode}, T={T}, frame {frame}, global batch {gb} on {ndev} "
        f"device(s), {config.train.dtype}, trainable {trainable}"
    )
    rows = [
        [desc, fmt_time(dt), f"{gb / dt:.2f} images/s", f"{gb * T / dt:.2f} clicks/s"],
        [
            "train step: XLA FLOPs per device, MFU",
            fmt_flops(flops),
            f"{fmt_flops(flops / dt)}/s achieved",
            f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a (no peak for this device)",
        ],
    ]
    info = {
        "compile_s": compile_s,
        "step_s": dt,
        "flops": flops,
        "peak_key": key,
        "loss": float(m["loss"]),
    }
    return rows, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    ap.add_argument("--runs", type=int, default=None, help="timed encoder runs")
    ap.add_argument("--clicks", type=int, default=None, help="timed clicks per mode")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps")
    a = ap.parse_args(argv)
    runs = a.runs or (2 if a.smoke else 10)
    clicks = a.clicks or (3 if a.smoke else 20)
    steps = a.steps or (2 if a.smoke else 10)

    import jax

    t_all = time.perf_counter()
    train_cfg, enc_cfg = _configs(a.smoke)
    dev = jax.devices()[0]
    key = peak_key(dev.device_kind)
    print(
        f"backend={jax.default_backend()} device={dev.device_kind} x{jax.device_count()} "
        f"jax={jax.__version__}{' (smoke: tiny sizes)' if a.smoke else ''}"
    )
    print(
        f"peak used for MFU: {key} = {PEAK_FLOPS[key] / 1e12:.0f} TFLOP/s bf16 dense"
        if key
        else "peak used for MFU: none (device not in the table)"
    )
    from samref_jax.samref.model import init_samref_params

    def partial(new_rows: list[list[str]]) -> list[list[str]]:
        # each row as soon as it is measured, so a run cut short still reports something
        for r in new_rows:
            print("row: " + " | ".join(str(c) for c in r), flush=True)
        return new_rows

    tic = time.perf_counter()
    rows = partial(bench_encoder(enc_cfg, runs))
    sections = {"encoder": time.perf_counter() - tic}
    params = jax.jit(lambda k: init_samref_params(train_cfg.model, k))(
        jax.random.key(0, impl="rbg")
    )  # random weights, shared by the click and train rows
    tic = time.perf_counter()
    rows += partial(bench_clicks(train_cfg.model, params, clicks))
    sections["init + clicks"] = time.perf_counter() - tic
    tic = time.perf_counter()
    train_rows, info = bench_train_step(train_cfg, params, steps)
    sections["train step"] = time.perf_counter() - tic
    rows += partial(train_rows)
    print()
    print("| measurement | time | rate / ratio | work |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print()
    print("| device (bf16 dense peak) | TFLOP/s |")
    print("|---|---|")
    for k, v in PEAK_FLOPS.items():
        print(f"| {k}{' (used)' if k == key else ''} | {v / 1e12:.0f} |")
    print(
        f"\ntrain step compile {info['compile_s']:.1f} s; loss {info['loss']:.3f}; "
        + "; ".join(f"{k} {v:.1f} s" for k, v in sections.items())
        + f"; total {time.perf_counter() - t_all:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
