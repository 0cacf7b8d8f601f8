"""``samref-eval`` command line (also ``python -m samref_jax.evaluate``).

Evaluate a checkpoint::

    samref-eval --checkpoint DIR --dataset GrabCut --data-dir PATH --mode full \\
        --max-clicks 20 --output OUT [--limit N]

``--data-dir`` is the dataset's upstream folder (``.../GrabCut``) or a folder holding it
(``.../data``); ``--tfds-dir`` reads a prepared TFDS/ArrayRecord copy instead. Several modes
(``--mode sam full``) share one image embedding per image (the predictor needs ``set_mode``)
and write ``OUT/<mode>/``.

Evaluate the classical OpenCV GrabCut peer (no checkpoint; ``pip install samref-jax[opencv]``;
see :mod:`samref_jax.evaluation.grabcut`), a row ``opencv-grabcut`` in ``compare`` tables::

    samref-eval --method opencv-grabcut --dataset GrabCut --data-dir PATH --output OUT

Merge runs into one table and plot::

    samref-eval compare --output OUT [--labels sam full] RUN1/metrics.json RUN2/metrics.json
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samref_jax.evaluation.evaluator import evaluate
from samref_jax.evaluation.report import compare, write_metrics_markdown

__all__ = ["build_parser", "compare", "evaluate", "load_samples", "main"]

MODES = ("sam", "global", "full")
METHODS = ("samref", "opencv-grabcut")


def _resolve_root(dataset: str, data_dir: str | Path) -> Path:
    from samref_jax.data.folders import get_layout

    layout = get_layout(dataset)
    data_dir = Path(data_dir).expanduser()
    for cand in (data_dir, data_dir / layout.name):
        if (cand / layout.image_dir).is_dir():
            return cand
    raise FileNotFoundError(
        f"no {layout.name} folder (with {layout.image_dir}/) at {data_dir} "
        f"or {data_dir / layout.name}"
    )


def load_samples(
    dataset: str,
    data_dir: str | Path | None = None,
    split: str | None = None,
    tfds_dir: str | Path | None = None,
) -> Sequence[Any]:
    """Samples of ``dataset`` from its upstream folder, or from a prepared TFDS copy."""
    if tfds_dir is not None:
        from samref_jax.data.tfds_builders import grain_source

        return grain_source(dataset, tfds_dir, split)
    if data_dir is None:
        raise ValueError("give --data-dir (upstream folder) or --tfds-dir (prepared TFDS)")
    from samref_jax.data.folders import read_folder_dataset

    return read_folder_dataset(dataset, _resolve_root(dataset, data_dir), split)


def _make_predictor(factory: str | None, checkpoint: str | None, mode: str) -> Any:
    if factory:
        module, _, name = factory.partition(":")
        return getattr(importlib.import_module(module), name or "make_predictor")(checkpoint, mode)
    from samref_jax.model.predictor import SamRefPredictor  # lazy: heavy, and optional here

    return SamRefPredictor.from_checkpoint(checkpoint, mode=mode)


def build_parser() -> argparse.ArgumentParser:
    """Parser of the evaluation command (``compare`` has its own, see :func:`main`)."""
    p = argparse.ArgumentParser(
        prog="samref-eval",
        description="NoC evaluation of SAM-REF (RITM protocol). "
        "Use 'samref-eval compare ...' to merge runs.",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="samref",
        help="samref (a checkpoint) or opencv-grabcut (classical peer: no checkpoint, no mode)",
    )
    p.add_argument("--checkpoint", help="checkpoint directory")
    p.add_argument(
        "--dataset", default="GrabCut", help="GrabCut, Berkeley, DAVIS, COCO_MVal, SBD or PascalVOC"
    )
    p.add_argument("--data-dir", help="upstream dataset folder, or a folder holding it")
    p.add_argument("--tfds-dir", help="read a prepared TFDS (ArrayRecord) copy from here instead")
    p.add_argument("--split", default=None, help="dataset split (default: test, or val)")
    p.add_argument(
        "--mode",
        nargs="+",
        choices=MODES,
        default=["full"],
        help="predictor mode(s); several share one embedding per image",
    )
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument(
        "--stop-iou",
        type=float,
        default=None,
        help="early stop at this IoU (default: off, full curves)",
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--overlays", type=int, default=6, help="overlays of the N worst samples")
    p.add_argument("--label", default=None, help="run label in tables (default: the mode)")
    p.add_argument(
        "--predictor-factory",
        default=None,
        help="'module:function' called as function(checkpoint, mode) instead of "
        "SamRefPredictor.from_checkpoint",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--sequential-modes",
        action="store_true",
        help="run several modes one after the other (isolated per-click times) instead of "
        "at the same time",
    )
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="embed each image, then click it, in turn (default: the next image is embedded "
        "in the background while the current one is clicked)",
    )
    p.add_argument(
        "--grabcut-radius",
        type=int,
        default=5,
        help="opencv-grabcut: click disk radius in image pixels (default 5)",
    )
    p.add_argument(
        "--grabcut-iterations",
        type=int,
        default=3,
        help="opencv-grabcut: GrabCut iterations per click (default 3)",
    )
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samref-eval compare",
        description="Merge metrics.json files: rows are runs, columns are dataset x metric.",
    )
    p.add_argument("metrics", nargs="+", help="metrics.json files (or run folders)")
    p.add_argument("--labels", nargs="+", default=None, help="one row label per metrics file")
    p.add_argument("--output", required=True, help="folder for comparison.md/.png, or a .md path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``samref-eval``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        args = _compare_parser().parse_args(argv[1:])
        print(compare(args.metrics, args.labels, args.output), end="")
        return 0
    args = build_parser().parse_args(argv)
    peer = None
    if args.method == "opencv-grabcut":  # classical peer: no checkpoint, the mode is moot
        from samref_jax.evaluation import grabcut

        try:
            peer = grabcut.GrabCutPredictor(args.grabcut_radius, args.grabcut_iterations)
        except (ImportError, ValueError) as err:
            print(f"samref-eval: {err}", file=sys.stderr)
            return 2
    samples = load_samples(args.dataset, args.data_dir, args.split, args.tfds_dir)
    modes = [args.method] if peer is not None else list(dict.fromkeys(args.mode))
    if peer is not None:
        predictor = peer
    else:
        predictor = _make_predictor(args.predictor_factory, args.checkpoint, modes[0])
    from samref_jax.data.folders import get_layout

    metadata = {
        "dataset": get_layout(args.dataset).name,
        "split": args.split or get_layout(args.dataset).default_split,
        "checkpoint": args.checkpoint,
        "data": str(args.tfds_dir or args.data_dir),
        "limit": args.limit,
        "command": "samref-eval " + " ".join(argv),
        **(peer.metadata() if peer is not None else {}),
    }
    if len(modes) == 1:
        metadata.update(mode=modes[0], label=args.label or modes[0])
    result = evaluate(
        predictor,
        samples,
        max_clicks=args.max_clicks,
        output_dir=args.output,
        stop_iou=args.stop_iou,
        limit=args.limit,
        modes=modes if len(modes) > 1 else None,
        metadata=metadata,
        num_overlays=args.overlays,
        progress=not args.no_progress,
        concurrent_modes=not args.sequential_modes,
        prefetch=not args.no_prefetch,
    )
    runs = result if len(modes) > 1 else {modes[0]: result}
    for mode, metrics in runs.items():
        out = Path(args.output) / mode if len(modes) > 1 else Path(args.output)
        print(write_metrics_markdown(metrics, out / "metrics.md"), end="")
    if len(modes) > 1:  # one table and one plot with a line per mode
        out = Path(args.output)
        print(compare([out / m / "metrics.json" for m in modes], modes, out), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
