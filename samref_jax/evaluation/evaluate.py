"""``samref eval`` and ``samref compare`` (also the ``samref-eval`` console script and
``python -m samref_jax.evaluation.evaluate``; ``samref-eval compare`` is ``samref compare``).

Evaluate a checkpoint::

    samref eval --checkpoint DIR --dataset GrabCut --data-dir PATH --mode full \\
        --max-clicks 20 --output OUT [--limit N]

``--data-dir`` is the dataset's upstream folder (``.../GrabCut``) or a folder holding it
(``.../data``); ``--tfds-dir`` reads a prepared TFDS/ArrayRecord copy instead. Several modes
(``--mode sam full``) share one image embedding per image (the predictor needs ``set_mode``)
and write ``OUT/<mode>/``.

``--dtype bfloat16`` runs the model's computations in bfloat16 (parameters stay float32); the
dtype is part of the run's identity (``run.json``, ``metrics.json`` metadata), so a resume with
another dtype is refused like one with another mode.

Mask correction (FocalClick's protocol, e.g. DAVIS-585): every sample starts from the mask
``DIR/<id>.png`` (nonzero = object), the first click corrects it; the folder is part of the
run's identity::

    samref eval --checkpoint DIR --dataset DAVIS --data-dir PATH --init-masks MASKS --output OUT

Evaluate the classical OpenCV GrabCut peer (no checkpoint; ``pip install samref-jax[opencv]``;
see :mod:`samref_jax.evaluation.grabcut`), a row ``opencv-grabcut`` in ``compare`` tables::

    samref eval --method opencv-grabcut --dataset GrabCut --data-dir PATH --output OUT

Merge runs into one table and plot::

    samref compare --output OUT [--labels sam full] RUN1/metrics.json RUN2/metrics.json
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
from samref_jax.loading import DTYPES
from samref_jax.paths import as_path

__all__ = ["build_parser", "compare", "compare_main", "evaluate", "load_samples", "main"]

MODES = ("sam", "global", "full")
METHODS = ("samref", "opencv-grabcut")


def _resolve_root(dataset: str, data_dir: str | Path) -> Path:
    from samref_jax.data.folders import get_layout

    layout = get_layout(dataset)
    data_dir = as_path(data_dir).expanduser()  # epath: gs://... kept verbatim
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


def _make_predictor(
    factory: str | None, checkpoint: str | None, mode: str, dtype: str = "float32"
) -> Any:
    if factory:
        module, _, name = factory.partition(":")
        return getattr(importlib.import_module(module), name or "make_predictor")(checkpoint, mode)
    import jax.numpy as jnp  # lazy: heavy, and optional here

    from samref_jax.samref.predictor import SamRefPredictor

    return SamRefPredictor.from_checkpoint(checkpoint, mode=mode, dtype=jnp.dtype(dtype))


def build_parser(prog: str = "samref-eval") -> argparse.ArgumentParser:
    """Parser of the evaluation command (``compare`` has its own, see :func:`compare_main`)."""
    p = _Parser(
        prog=prog,
        description="NoC evaluation of SAM-REF (RITM protocol): simulated clicks on a dataset;\n"
        "NoC/NoF/mIoU metrics, curves and overlays; resumable. 'samref compare' merges runs.",
        epilog="example (the bundled model, two GrabCut images, 3 clicks):\n"
        "  samref eval --checkpoint tiny --dataset GrabCut --data-dir $SAMREF_DATA_DIR \\\n"
        "      --mode sam full --max-clicks 3 --limit 2 --output runs/eval_demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="compute dtype of the model (parameters stay float32); part of the run's "
        "identity: a resume with another dtype is refused (default: float32)",
    )
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument(
        "--init-masks",
        metavar="DIR",
        default=None,
        help="mask correction: start every sample from DIR/<sample id>.png (nonzero = object; "
        "its IoU is click 0, the first click corrects it); part of the run's identity",
    )
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
        "--skip-bad",
        action="store_true",
        help="record a sample that cannot be read or used (failed.jsonl, metrics.json "
        "'failed': id and reason) and go on, instead of stopping with an error",
    )
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
    p.add_argument(
        "--grabcut-carry",
        choices=("models", "mask", "none"),
        default="none",
        help="opencv-grabcut: what carries over between clicks: nothing (default: each click "
        "starts from all clicks' disks), the label mask and colour models, or the label mask "
        "only (models refitted)",
    )
    return p


def _compare_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Merge metrics.json files: rows are runs, columns are dataset x metric.",
        epilog="example:\n  samref compare --output runs/eval_demo runs/eval_demo/*/metrics.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("metrics", nargs="+", help="metrics.json files (or run folders)")
    p.add_argument("--labels", nargs="+", default=None, help="one row label per metrics file")
    p.add_argument("--output", required=True, help="folder for comparison.md/.png, or a .md path")
    return p


class EvalError(Exception):
    """A user error of ``samref-eval``: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``PROG: error: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None, prog: str = "samref-eval") -> int:
    """``samref eval`` (``samref-eval``); returns the exit status (2 on user errors).
    ``argv`` starting with ``compare`` is :func:`compare_main`.

    Every user error (unknown dataset, missing data or checkpoint, a missing, mis-sized or
    unreadable sample file, --max-clicks outside the model's click slots, a damaged or foreign
    output folder) is one line on stderr and exit status 2; Ctrl-C is one line and exit status
    130. The inputs are checked before the model is loaded. Samples finished before an error
    or Ctrl-C stay in ``samples.jsonl``.
    """
    from samref_jax.host import tune_malloc

    tune_malloc()  # before JAX starts its threads (samref_jax/host.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:], f"{prog} compare")
    try:
        return _main(argv, prog)
    except EvalError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{prog}: error: interrupted; finished samples are kept in samples.jsonl (run the "
            "same command again to resume)",
            file=sys.stderr,
        )
        return 130  # the shell's status for SIGINT


def compare_main(argv: Sequence[str] | None = None, prog: str = "samref compare") -> int:
    """``samref compare`` (``samref-eval compare``): one table and plot from metrics files."""
    args = _compare_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        print(compare(args.metrics, args.labels, args.output), end="")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else type(e).__name__
    return text.strip("'\"") if isinstance(e, KeyError) else text


def _check_args(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit <= 0:
        raise EvalError(f"--limit must be a positive number of samples, got {args.limit}")
    if args.max_clicks < 1:
        raise EvalError(f"--max-clicks must be at least 1, got {args.max_clicks}")
    if args.stop_iou is not None and not 0.0 < args.stop_iou <= 1.0:
        raise EvalError(f"--stop-iou must be in (0, 1], got {args.stop_iou}")
    if args.overlays < 0:
        raise EvalError(f"--overlays must be 0 or more, got {args.overlays}")
    if args.dtype != "float32" and (args.method != "samref" or args.predictor_factory):
        raise EvalError(
            f"--dtype {args.dtype} needs the SAM-REF model (--checkpoint, no --predictor-factory)"
        )
    out = as_path(args.output)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--output is not a folder: {out}")
    if args.init_masks is not None:
        if args.method != "samref":
            raise EvalError(f"--init-masks needs the SAM-REF model, not --method {args.method}")
        if not as_path(args.init_masks).is_dir():
            raise EvalError(f"--init-masks: no folder {args.init_masks}")


def _checkpoint_identity(checkpoint: str, max_clicks: int) -> dict:
    """Checks the checkpoint exists and has ``max_clicks`` click slots; its name and hash."""
    import hashlib

    from samref_jax.checkpoint import CheckpointError, read_metadata
    from samref_jax.samref.io import resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint)
        meta = read_metadata(path)
    except CheckpointError as e:
        raise EvalError(f"--checkpoint: {e}") from None
    slots = (meta.get("samref_config") or {}).get("max_clicks")
    if slots is None:
        from samref_jax.samref.config import samref_model_config

        slots = samref_model_config("tiny").max_clicks  # the default of every model config
    if not 1 <= max_clicks <= int(slots):
        raise EvalError(
            f"--max-clicks {max_clicks} is outside 1..{slots}: the model has {slots} click slots"
        )
    h = hashlib.sha256()
    path = as_path(path)  # epath: bundled (pathlib) or user-given (maybe gs://) alike
    for f in sorted(d / n for d, _, names in path.walk() for n in names):  # epath: no rglob
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": h.hexdigest()}


def _check_sample_files(samples: Any, n: int) -> None:
    """Reads the image and mask headers of the first ``n`` samples of an upstream folder
    (cheap): a missing, unreadable or mis-sized file stops here, before the model loads."""
    from PIL import Image

    layout, index = getattr(samples, "layout", None), getattr(samples, "_index", None)
    if layout is None or index is None or layout.kind != "pairs":
        return
    for record, _ in index[:n]:
        sizes = []
        for path in (record.image_path, record.mask_path):
            try:
                with Image.open(path) as im:
                    w, h = im.size
                    if path == record.image_path and im.getexif().get(274) in (5, 6, 7, 8):
                        w, h = h, w  # shown rotated by 90 degrees (EXIF orientation)
            except Exception as e:
                raise EvalError(
                    f"{path}: not a readable image ({type(e).__name__}: {_one_line(e)}); "
                    "fix or remove it, or pass --skip-bad"
                ) from None
            sizes.append((w, h))
        if sizes[0] != sizes[1]:
            raise EvalError(
                f"mask {record.mask_path} is {sizes[1][0]}x{sizes[1][1]} but image "
                f"{record.image_path} is {sizes[0][0]}x{sizes[0][1]}; fix it, or pass --skip-bad"
            )


def _check_init_masks(samples: Any, n: int, folder: str) -> None:
    """Every one of the first ``n`` samples has ``folder/<id>.png`` (cheap; only when the ids
    are known up front): a missing one stops here, before the model loads."""
    ids = getattr(samples, "ids", None)
    if ids is None:
        return
    for sid in list(ids)[:n]:
        path = as_path(folder) / f"{sid}.png"
        if not path.is_file():
            raise EvalError(
                f"--init-masks: no initial mask {path} for sample {sid!r}; "
                "add it, or pass --skip-bad"
            )


def _main(argv: list[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    _check_args(args)
    from samref_jax.checkpoint import CheckpointError
    from samref_jax.data.decode import DataError
    from samref_jax.data.folders import get_layout
    from samref_jax.evaluation.evaluator import (
        ResumeError,
        SampleError,
        check_resumable,
        run_folders,
    )

    try:
        layout = get_layout(args.dataset)
    except KeyError as e:
        raise EvalError(_one_line(e)) from None
    identity: dict[str, Any] = {"method": args.method}
    peer = None
    if args.method == "opencv-grabcut":  # classical peer: no checkpoint, the mode is moot
        from samref_jax.evaluation import grabcut

        try:
            peer = grabcut.GrabCutPredictor(
                args.grabcut_radius, args.grabcut_iterations, args.grabcut_carry
            )
        except (ImportError, ValueError) as err:
            raise EvalError(_one_line(err)) from None
        identity.update(peer.metadata())
    elif args.predictor_factory:
        identity.update(predictor_factory=args.predictor_factory, checkpoint=args.checkpoint)
    elif not args.checkpoint:
        raise EvalError("give --checkpoint DIR (or a bundled name: tiny, tiny-sam)")
    else:
        identity.update(_checkpoint_identity(args.checkpoint, args.max_clicks))
    if peer is None:
        identity["dtype"] = args.dtype
    try:
        samples = load_samples(args.dataset, args.data_dir, args.split, args.tfds_dir)
    except (DataError, OSError, ValueError) as e:
        raise EvalError(_one_line(e)) from None
    n = len(samples) if args.limit is None else min(args.limit, len(samples))
    if n == 0:
        raise EvalError(f"no {layout.name} samples found in {args.tfds_dir or args.data_dir}")
    if not args.skip_bad:
        _check_sample_files(samples, n)
        if args.init_masks is not None:
            _check_init_masks(samples, n, args.init_masks)
    if args.init_masks is not None:  # the same string as evaluate() records
        identity["init_masks"] = str(as_path(args.init_masks, absolute=True))
    split = args.split or layout.default_split
    identity.update(dataset=layout.name, split=split)
    modes = [args.method] if peer is not None else list(dict.fromkeys(args.mode))
    folders = run_folders(
        args.output,
        modes if len(modes) > 1 else None,
        identity,
        modes[0],
        args.max_clicks,
        args.stop_iou,
    )
    try:  # a damaged or foreign output folder stops here, before the model loads
        for folder, ident in folders.values():
            check_resumable(folder, ident, args.max_clicks)
    except ResumeError as e:
        raise EvalError(_one_line(e)) from None
    if peer is not None:
        predictor = peer
    else:
        try:
            predictor = _make_predictor(
                args.predictor_factory, args.checkpoint, modes[0], args.dtype
            )
        except CheckpointError as e:
            raise EvalError(f"cannot load checkpoint {args.checkpoint}: {_one_line(e)}") from None

    metadata = {
        "dataset": layout.name,
        "split": split,
        "checkpoint": args.checkpoint,
        "data": str(args.tfds_dir or args.data_dir),
        "limit": args.limit,
        "command": f"{prog} " + " ".join(argv),
        **(peer.metadata() if peer is not None else {"dtype": args.dtype}),
    }
    if len(modes) == 1:
        metadata.update(mode=modes[0], label=args.label or modes[0])
    try:
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
            skip_bad=args.skip_bad,
            identity=identity,
            init_masks=args.init_masks,
        )
    except (ResumeError, SampleError) as e:
        raise EvalError(_one_line(e)) from None
    runs = result if len(modes) > 1 else {modes[0]: result}
    for mode, metrics in runs.items():
        out = as_path(args.output) / mode if len(modes) > 1 else as_path(args.output)
        print(write_metrics_markdown(metrics, out / "metrics.md"), end="")
    if len(modes) > 1:  # one table and one plot with a line per mode
        out = as_path(args.output)
        print(compare([out / m / "metrics.json" for m in modes], modes, out), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
