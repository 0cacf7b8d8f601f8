"""The evaluation machinery's cost against the image encoder's: a NoC run vs its encoder passes.

    python benchmarks/eval_machinery.py --checkpoint checkpoints/vit_b_random \
        --data-dir $SAMREF_DATA_DIR [--modes sam full] [--max-clicks 20] [--limit N] \
        [--no-prefetch] [--sequential-modes] [--output runs/eval_machinery]

In one process: (1) every image's encoder pass alone (`prepare_image`: SAM's embedding and
GlobalDiff's per-image inputs, one image after the other, compiled beforehand); (2) the
evaluator's whole run (`samref_jax.evaluation.evaluate`: the modes' click loops, the host click
simulator, IoU, records, reports) on a fresh predictor, so its compiles are in it as in
`samref-eval`. Prints a table with the run's wall time over the encoder passes alone (the
target: <= 1.3 for 20 clicks of `sam` and `full`; docs/benchmarks.md). Random weights are
fine: this measures the machinery, not the NoC.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import host_setup, machine_line, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir or a bundled name")
    ap.add_argument("--dataset", default="GrabCut")
    ap.add_argument("--data-dir", required=True, help="upstream dataset folder or its parent")
    ap.add_argument("--modes", nargs="+", default=["sam", "full"])
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--limit", type=int, default=None, help="the first N samples only")
    ap.add_argument("--no-prefetch", action="store_true", help="evaluate(prefetch=False)")
    ap.add_argument(
        "--sequential-modes", action="store_true", help="evaluate(concurrent_modes=False)"
    )
    ap.add_argument("--output", default=None, help="the evaluator's outputs (default: none)")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc settings")
    args = ap.parse_args()
    host_setup(args.default_malloc)

    import numpy as np

    from samref_jax.evaluation.evaluate import load_samples
    from samref_jax.evaluation.evaluator import evaluate
    from samref_jax.samref.predictor import SamRefPredictor

    print(machine_line(), flush=True)
    samples = load_samples(args.dataset, args.data_dir)
    n = len(samples) if args.limit is None else min(args.limit, len(samples))
    images = [np.asarray(samples[i]["image"]) for i in range(n)]

    p = SamRefPredictor.from_checkpoint(args.checkpoint, mode=args.modes[0])
    t = time.perf_counter()
    p.prepare_image(images[0])
    compile_s = time.perf_counter() - t
    encoder = []
    for image in images:
        t = time.perf_counter()
        p.prepare_image(image)
        encoder.append(time.perf_counter() - t)
        print(f"encoder pass {len(encoder)}/{n}: {encoder[-1]:.2f} s", flush=True)
    del p

    fresh = SamRefPredictor.from_checkpoint(args.checkpoint, mode=args.modes[0])
    t = time.perf_counter()
    res = evaluate(
        fresh,
        samples,
        args.max_clicks,
        args.output,
        limit=n,
        modes=args.modes if len(args.modes) > 1 else None,
        metadata={"dataset": args.dataset, "checkpoint": str(args.checkpoint)},
        concurrent_modes=not args.sequential_modes,
        prefetch=not args.no_prefetch,
    )
    run_s = time.perf_counter() - t
    per_mode = res if len(args.modes) > 1 else {args.modes[0]: res}
    first = next(iter(per_mode.values()))
    loop_s = first["metadata"]["loop_wall_s"]
    enc_total = float(sum(encoder))
    tm = first["timing"]
    rows = [
        [f"{n} encoder passes alone: total, median", f"{enc_total:.1f} s, "
         f"{statistics.median(encoder):.2f} s (first call with compile {compile_s:.1f} s)"],
        ["evaluation loop, all modes (`loop_wall_s`)", f"{loop_s:.1f} s"],
        ["`evaluate()` call (plus reports, plots, overlays)", f"{run_s:.1f} s"],
        ["encoder passes inside the loop (overlapped with clicks when prefetching)",
         f"{tm['embedding_total_s']:.1f} s"],
        ["loop waiting for the encoder", "n/a" if tm["embedding_wait_total_s"] is None
         else f"{tm['embedding_wait_total_s']:.1f} s"],
    ]  # fmt: skip
    for mode, m in per_mode.items():
        t_ = m["timing"]
        rows.append([
            f"`{mode}`: clicks, total click time, click simulator",
            f"{t_['num_clicks']}, {t_['click_total_s']:.1f} s, {t_['clicker_total_s']:.1f} s",
        ])  # fmt: skip
    rows += [
        ["**loop / encoder passes alone** (target <= 1.3)", f"**{loop_s / enc_total:.3f}**"],
        ["`evaluate()` call / encoder passes alone", f"{run_s / enc_total:.3f}"],
    ]
    print()
    print(
        f"{args.dataset}, {n} images, modes {' + '.join(args.modes)}, {args.max_clicks} clicks, "
        f"prefetch={not args.no_prefetch}, concurrent_modes={not args.sequential_modes}"
    )
    print(table(["part", "measured"], rows))
    print(machine_line())


if __name__ == "__main__":
    main()
