"""bfloat16 against float32 inference of a SAM-REF model: NoC, 5-mIoU and per-click agreement.

    python benchmarks/bf16_agreement.py --data-dir $SAMREF_DATA_DIR \
        [--runs tiny:full tiny-sam:sam] [--limit 20] [--max-clicks 20] [--json out.json]

For every run (``checkpoint:mode``) and every sample, in one process: the RITM click loop of
the evaluator (``samref_jax.evaluation.evaluator.run_sample``) with a float32 and with a
bfloat16 predictor (``SamRefPredictor(dtype=...)``, as ``--dtype`` builds it), each run's clicks
following its own masks; then the bfloat16 predictor again on the float32 run's click sequence.
Prints a markdown table: NoC@85/90 and 5-mIoU of each dtype, per-click mask agreement (fraction
of the image's pixels equal in the float32 and bfloat16 masks after the same click number; mean
and worst over all samples x clicks) on each run's own clicks and on the float32 clicks, how
many samples got the same click sequence, and the seconds per click of each dtype.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from _common import host_setup, machine_line, table


class _Recorder:
    """The evaluator's predictor API around a predictor, keeping every click's mask."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.masks: list[np.ndarray] = []

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def reset(self) -> None:
        self.predictor.reset()
        self.masks = []

    def click(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        mask = np.asarray(self.predictor.click(x, y, positive=positive).mask, bool)
        self.masks.append(mask)
        return mask


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> list[float]:
    """Per click: fraction of pixels equal in the (H, W) bool masks a[k] and b[k]."""
    return [float((x == y).mean()) for x, y in zip(a, b, strict=True)]


def run_pair(checkpoint: str, mode: str, samples: Any, n: int, max_clicks: int) -> dict[str, Any]:
    """Both dtypes on the first ``n`` samples; the row of the table and the per-sample data."""
    from samref_jax.evaluation import metrics as M
    from samref_jax.evaluation.evaluator import _as_str, run_sample
    from samref_jax.loading import load_predictor

    preds = {d: _Recorder(load_predictor(checkpoint, mode, d)) for d in ("float32", "bfloat16")}
    curves: dict[str, list[list[float]]] = {d: [] for d in preds}
    seconds: dict[str, list[float]] = {d: [] for d in preds}
    own: list[float] = []
    replay: list[float] = []
    same_clicks = 0
    per_sample = []
    for i in range(n):
        sample = samples[i]
        image, gt = np.asarray(sample["image"]), np.asarray(sample["gt"])
        recs, masks = {}, {}
        for d, p in preds.items():
            rec, _ = run_sample(p, image, gt, max_clicks)
            recs[d], masks[d] = rec, list(p.masks)
            curves[d].append(rec["ious"])
            if i > 0:  # the first sample compiles
                seconds[d].extend(rec["click_seconds"])
        # bfloat16 on the float32 clicks ([y, x, positive]); its image is still set.
        bf = preds["bfloat16"]
        bf.reset()
        for y, x, positive in recs["float32"]["clicks"]:
            bf.click(x, y, positive=bool(positive))
        a_own = agreement(masks["float32"], masks["bfloat16"])
        a_replay = agreement(masks["float32"], bf.masks)
        own += a_own
        replay += a_replay
        same = recs["float32"]["clicks"] == recs["bfloat16"]["clicks"]
        same_clicks += same
        per_sample.append(
            {
                "id": _as_str(sample["id"]),
                "ious": {d: recs[d]["ious"] for d in preds},
                "same_clicks": same,
                "agreement_own": a_own,
                "agreement_f32_clicks": a_replay,
            }
        )
        print(
            f"{checkpoint}:{mode} {i + 1}/{n} {per_sample[-1]['id']}: "
            f"min agreement own {min(a_own):.4f}, f32 clicks {min(a_replay):.4f}",
            flush=True,
        )
    summary = {d: M.summarize(curves[d], max_clicks) for d in preds}
    return {
        "run": f"{checkpoint}:{mode}",
        "summary": summary,
        "seconds_per_click": {d: float(np.mean(s)) if s else None for d, s in seconds.items()},
        "agreement_own": {"mean": float(np.mean(own)), "worst": float(np.min(own))},
        "agreement_f32_clicks": {"mean": float(np.mean(replay)), "worst": float(np.min(replay))},
        "same_clicks": same_clicks,
        "num_samples": n,
        "samples": per_sample,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="GrabCut folder or a folder holding it")
    ap.add_argument("--dataset", default="GrabCut")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["tiny:full", "tiny-sam:sam"],
        help="checkpoint:mode pairs (default: tiny:full tiny-sam:sam)",
    )
    ap.add_argument("--limit", type=int, default=20, help="the first N samples (default 20)")
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--json", default=None, help="write every number (per sample too) here")
    args = ap.parse_args()
    host_setup()
    from samref_jax.evaluation.evaluate import load_samples

    samples = load_samples(args.dataset, args.data_dir)
    n = min(args.limit, len(samples))
    start = time.perf_counter()
    results = []
    for spec in args.runs:
        checkpoint, _, mode = spec.partition(":")
        results.append(run_pair(checkpoint, mode or "full", samples, n, args.max_clicks))
    rows = []
    for r in results:
        s = r["summary"]
        for d in ("float32", "bfloat16"):
            a_own, a_rep = r["agreement_own"], r["agreement_f32_clicks"]
            rows.append(
                [
                    f"`{r['run']}`",
                    d,
                    f"{s[d]['NoC@85']:.2f}",
                    f"{s[d]['NoC@90']:.2f}",
                    f"{100 * s[d]['5-mIoU']:.2f}",
                    ""
                    if d == "float32"
                    else f"{100 * a_own['mean']:.3f} / {100 * a_own['worst']:.2f}",
                    ""
                    if d == "float32"
                    else f"{100 * a_rep['mean']:.3f} / {100 * a_rep['worst']:.2f}",
                    "" if d == "float32" else f"{r['same_clicks']}/{r['num_samples']}",
                    f"{r['seconds_per_click'][d]:.3f}",
                ]
            )
    headers = [
        "run",
        "dtype",
        "NoC@85",
        "NoC@90",
        "5-mIoU %",
        "agreement % own clicks (mean / worst)",
        "agreement % f32 clicks (mean / worst)",
        "same clicks",
        "s/click",
    ]
    print(f"\n{args.dataset}, first {n} samples, {args.max_clicks} clicks; {machine_line()}")
    print(f"total {time.perf_counter() - start:.0f} s\n")
    print(table(headers, rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"limit": n, "max_clicks": args.max_clicks, "runs": results}, fh, indent=1)


if __name__ == "__main__":
    main()
