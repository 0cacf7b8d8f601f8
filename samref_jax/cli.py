"""The ``samref`` command line (also ``python -m samref_jax.cli``): one entry point for
everything; ``samref COMMAND --help`` describes each command with an example.

    samref convert --checkpoint sam_vit_b_01ec64.pth --output checkpoints/vit_b
    samref segment photo.jpg --click 120,80,+ --click 60,40,- --out out/   # writes
    # out/mask.png (0/255, the image's size) and out/overlay.png (mask, clicks, PatchDiff window)
    samref amg --image photo.jpg --out out/amg   # automatic masks: one PNG each + masks.json
    samref eval --checkpoint tiny --dataset GrabCut --data-dir DATA --output runs/eval
    samref compare --output runs/eval runs/eval/*/metrics.json
    samref prepare-coco --name coco_lvis --data-dir DATA --annotations X.json --images DIR
    samref train --config configs/tiny_cpu.py --workdir runs/tiny [--config.a.b=v ...]
    samref cache-embeddings --config configs/X.py --workdir runs/x
    samref launch-local --num_processes 2 -- --config configs/tiny_cpu.py --workdir runs/mp
    samref demo --checkpoint tiny --port 7860   # browser demo; needs the ``demo`` extra
    samref export --checkpoint tiny --out exported/tiny   # jax.export programs for serving

``--checkpoint`` takes a checkpoint directory (SAM-REF, or SAM-only from ``samref convert``)
or a bundled model name (``tiny``, ``tiny-sam``); the default is ``tiny``.

User errors (a missing or unreadable image, a malformed click, a click outside the image, a
missing checkpoint) print one line ``samref <command>: error: ...`` on stderr and exit with
status 2, without a traceback. Ctrl-C prints one line ``samref <command>: ... interrupted ...``
(``segment`` and ``eval`` say what was kept) and exits with status 130.

Subcommands live in a small registry: add one with :func:`register`, either with a
``configure(parser)`` that adds its arguments and a ``run(args) -> int``, or with
``forward(argv, prog) -> int`` for a command that parses its own arguments (``convert``,
``eval``, ``compare``, ``prepare-coco``, ``train``, ``cache-embeddings``, ``launch-local``: the
functions behind ``convert_weights.py``, ``samref-eval``, ``python -m train.main`` ...).
:func:`main` builds the argparse subparsers from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samref_jax.loading import (
    DTYPES,
    LoadError,
    check_checkpoint,
    load_predictor,
    short_reason,
)

__all__ = [
    "COMMANDS",
    "CliError",
    "Command",
    "build_parser",
    "load_predictor",
    "main",
    "parse_click",
    "register",
]

MODES = ("sam", "global", "full")
DEFAULT_CHECKPOINT = "tiny"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``configure`` adds its arguments, ``run`` executes it (exit status); or
    ``forward(argv, prog)`` parses its own arguments (and ``--help``) and runs."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    description: str | None = None
    example: str | None = None
    aliases: tuple[str, ...] = ()
    forward: Callable[[list[str], str], int] | None = None


COMMANDS: dict[str, Command] = {}


def register(
    name: str,
    help: str,  # noqa: A002  argparse's word
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    run: Callable[[argparse.Namespace], int] | None = None,
    description: str | None = None,
    *,
    example: str | None = None,
    aliases: Sequence[str] = (),
    forward: Callable[[list[str], str], int] | None = None,
) -> Command:
    """Add (or replace) the subcommand ``name``."""
    if (forward is None) == (run is None):
        raise ValueError(f"command {name!r}: give either run (with configure) or forward")
    cmd = Command(name, help, configure, run, description, example, tuple(aliases), forward)
    COMMANDS[name] = cmd
    return cmd


def _lookup(name: str) -> Command | None:
    """The command called ``name`` or one of its aliases."""
    for cmd in COMMANDS.values():
        if name == cmd.name or name in cmd.aliases:
            return cmd
    return None


# ---------------------------------------------------------------------------------- helpers
_CLICK_RE = re.compile(
    r"^\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*,\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*"
    r"(?:,\s*([^\s,]+)\s*)?$",
    re.ASCII,  # plain 0-9 digits: no other scripts' digits, no nan/inf
)
_POSITIVE = {"+", "pos", "positive", "1", "p", "fg"}
_NEGATIVE = {"-", "neg", "negative", "0", "n", "bg"}


def parse_click(spec: str) -> tuple[float, float, bool]:
    """``"X,Y,+"`` / ``"X,Y,-"`` (or ``"X,Y"``, positive) -> ``(x, y, positive)``.

    The sign may also be written ``pos``/``neg``, ``1``/``0``, ``fg``/``bg``.
    """
    m = _CLICK_RE.match(spec)
    sign = (m.group(3) or "+").lower() if m else None
    if m is None or (sign not in _POSITIVE and sign not in _NEGATIVE):
        raise CliError(
            f"malformed click {spec!r}: expected X,Y,+ (positive) or X,Y,- (negative), "
            "e.g. --click 120,80,+"
        )
    x, y = float(m.group(1)), float(m.group(2))
    if not (math.isfinite(x) and math.isfinite(y)):  # e.g. 400 digits overflow to inf
        raise CliError(f"click {spec!r} has a coordinate that is not a finite number")
    return x, y, sign in _POSITIVE


def check_out_folder(out: str | Path) -> Path:
    """Raise :class:`CliError` unless ``out`` can be created or written as a folder.

    Checked before any compute; nothing is created here."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out is not a folder: {out}")
    for name in ("mask.png", "overlay.png"):
        if (out / name).is_dir():
            raise CliError(f"--out: {out / name} is a folder, so the output cannot be written")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != out and not probe.is_dir():
        raise CliError(f"--out {out} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: {probe} is not writable")
    return out


def check_clicks_inside(
    clicks: Sequence[tuple[float, float, bool]], width: int, height: int
) -> None:
    """Raise :class:`CliError` for the first click outside a ``width x height`` image."""
    for i, (x, y, _) in enumerate(clicks, start=1):
        if not (0 <= x < width and 0 <= y < height):
            raise CliError(
                f"click {i} ({x:g}, {y:g}) is outside the {width}x{height} image: "
                f"x must be in [0, {width}) and y in [0, {height})"
            )


def read_image_or_fail(path: str | Path):
    """The image at ``path`` as ``uint8[H, W, 3]`` RGB, or a :class:`CliError`."""
    from samref_jax.data.decode import DataError, read_image

    p = Path(path)
    if not p.exists():
        raise CliError(f"image not found: {p}")
    if not p.is_file():
        raise CliError(f"not a file: {p}")
    try:
        return read_image(p)
    except DataError as e:
        raise CliError(f"cannot read {p} as an image ({short_reason(e)})") from None
    except Exception as e:  # Pillow raises a few non-OSError types (e.g. decompression bombs)
        raise CliError(
            f"cannot read {p} as an image ({type(e).__name__}: {short_reason(e)})"
        ) from None


# ---------------------------------------------------------------------------------- segment
def _configure_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (any format Pillow reads)")
    p.add_argument(
        "--click",
        action="append",
        default=[],
        metavar="X,Y,SIGN",
        help="a click in pixels of the original image; SIGN is + (object) or - (background); "
        "repeat for more clicks, in order",
    )
    p.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help=f"checkpoint directory or bundled name (default: {DEFAULT_CHECKPOINT})",
    )
    p.add_argument("--mode", choices=MODES, default="full", help="refiners used (default: full)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="compute dtype (parameters stay float32); bfloat16 agreement with float32 on "
        "GrabCut: docs/evaluation.md (default: float32)",
    )
    p.add_argument("--out", required=True, help="output folder (created if needed)")


def _run_segment(args: argparse.Namespace) -> int:
    clicks = [parse_click(c) for c in args.click]
    if not clicks:
        raise CliError("give at least one click, e.g. --click 120,80,+")
    image = read_image_or_fail(args.image)
    h, w = image.shape[:2]
    check_clicks_inside(clicks, w, h)
    out = check_out_folder(args.out)
    mask_path, overlay_path = out / "mask.png", out / "overlay.png"
    written: list[Path] = []
    try:
        predictor = load_predictor(args.checkpoint, args.mode, args.dtype)

        from samref_jax import viz

        try:
            predictor.set_image(image)
            result = None
            for x, y, positive in clicks:
                result = predictor.click(x, y, positive=positive)
        except ValueError as e:
            raise CliError(str(e)) from None
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write_png(viz.mask_image(result.mask), mask_path)
            written.append(mask_path)
            _write_png(viz.overlay(image, result.mask, clicks, result.window), overlay_path)
            written.append(overlay_path)
        except OSError as e:  # e.g. the disk filled up, or permissions changed meanwhile
            raise CliError(f"cannot write to --out {out}: {e.strerror or e}") from None
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        what = f"wrote {mask_path}, not {overlay_path}" if written else f"wrote nothing to {out}"
        print(f"samref segment: interrupted; {what}", file=sys.stderr)
        return 130
    window = "none"
    if result.window is not None:
        window = "(" + ", ".join(f"{v:.0f}" for v in result.window) + ")"
    print(
        f"samref segment: {len(clicks)} click(s), mode {args.mode}, {args.dtype}, mask covers "
        f"{100 * result.mask.mean():.1f}% of {w}x{h}, SAM score {result.score:.3f}, "
        f"PatchDiff window {window}",
        file=sys.stderr,
    )
    print(mask_path)
    print(overlay_path)
    return 0


def _write_png(image: Any, path: Path) -> None:
    """Saves a PIL image as PNG at `path` through a temporary file in the same folder: an
    interrupted write leaves the old file (or none), never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- demo
def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help=f"checkpoint directory or bundled name (default: {DEFAULT_CHECKPOINT})",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")


def _run_demo(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CliError("the browser demo needs Gradio: pip install 'samref-jax[demo]'") from None
    check_checkpoint(args.checkpoint)
    from samref_jax.demo.app import launch

    try:
        launch(args.checkpoint, host=args.host, port=args.port, share=args.share)
    except OSError as e:  # port in use, address not available
        raise CliError(f"cannot serve on {args.host}:{args.port}: {e}") from None
    return 0


# ---------------------------------------------------------------------------------- export
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help=f"checkpoint directory or bundled name (default: {DEFAULT_CHECKPOINT})",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: new or empty (an earlier export is replaced only with --force)",
    )
    p.add_argument("--mode", choices=MODES, default="full", help="refiners used (default: full)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="compute dtype (parameters stay float32) (default: float32)",
    )
    p.add_argument(
        "--platforms",
        default=None,
        metavar="P[,P...]",
        help=f"platforms to lower for, of {', '.join(EXPORT_PLATFORMS)} (default: this "
        "machine's backend)",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")


def _run_export(args: argparse.Namespace) -> int:
    platforms = None
    if args.platforms is not None:
        platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
        bad = [p for p in platforms if p not in EXPORT_PLATFORMS]
        if bad or not platforms:
            raise CliError(
                f"--platforms {args.platforms!r}: give one or more of "
                f"{', '.join(EXPORT_PLATFORMS)}, separated by commas"
            )
    check_checkpoint(args.checkpoint)
    from samref_jax.checkpoint import CheckpointError
    from samref_jax.export import ExportError, check_export_directory, export_model

    try:
        check_export_directory(args.out, args.force)  # before the slow steps
        out = export_model(
            args.checkpoint,
            args.out,
            args.mode,
            args.dtype,
            force=args.force,
            platforms=platforms,
        )
    except ExportError as e:
        raise CliError(str(e)) from None
    except CheckpointError as e:
        raise LoadError(f"cannot load checkpoint {args.checkpoint}: {short_reason(e)}") from None
    except OSError as e:
        raise CliError(f"cannot write to --out {args.out}: {e.strerror or e}") from None
    print(
        f"samref export: {args.checkpoint}, mode {args.mode}, {args.dtype} -> params.npz, "
        "prepare.jax, click.jax, manifest.json",
        file=sys.stderr,
    )
    print(out)
    return 0


# ------------------------------------------------------------ commands with their own parser
def _forward_convert(argv: list[str], prog: str) -> int:
    from samref_jax.sam.convert import main as convert_main

    return convert_main(argv, prog=prog)


def _forward_eval(argv: list[str], prog: str) -> int:
    from samref_jax.evaluation.evaluate import main as eval_main

    return eval_main(argv, prog=prog)


def _forward_compare(argv: list[str], prog: str) -> int:
    from samref_jax.evaluation.evaluate import compare_main

    return compare_main(argv, prog=prog)


def _forward_prepare_coco(argv: list[str], prog: str) -> int:
    from samref_jax.data.coco_tfds import main as prepare_coco_main

    return prepare_coco_main(argv, prog=prog)


def _forward_train(argv: list[str], prog: str) -> int:
    from train.main import main as train_main

    return train_main(argv, prog=prog)


def _forward_cache_embeddings(argv: list[str], prog: str) -> int:
    from samref_jax.training.cache_embeddings import main as cache_main

    return cache_main(argv, prog=prog)


def _forward_launch_local(argv: list[str], prog: str) -> int:
    from samref_jax.training.launch import main as launch_main

    return launch_main(argv, prog=prog)


def _amg_cli():
    from samref_jax.sam import amg_cli

    return amg_cli


# ------------------------------------------------------------------------------ the registry
register(
    "convert",
    "convert an official SAM v1 .pth checkpoint (needs the torch extra)",
    forward=_forward_convert,
)
register(
    "segment",
    "segment an image from clicks; write mask.png and overlay.png",
    _configure_segment,
    _run_segment,
    description="Segment IMAGE with SAM-REF from the given clicks. Writes OUT/mask.png "
    "(0/255, the image's size) and OUT/overlay.png (mask, clicks, PatchDiff window) and prints "
    "their paths.",
    example="samref segment samref_jax/assets/examples/blob_on_stripes.png \\\n"
    "      --click 125,100,+ --click 120,215,- --out out/quickstart",
)
register(
    "amg",
    "automatic masks for whole images (SAM's point-grid generator); one PNG per mask + JSON",
    lambda p: _amg_cli().configure(p),
    lambda args: _amg_cli().run(args),
    description="Run the official SamAutomaticMaskGenerator's algorithm (point grid, IoU and "
    "stability filters, box NMS, optional crops and small-region removal) with the SAM part of "
    "a checkpoint on each --image (a file or a folder). Writes OUT/<image name>/NNN.png (0/255 "
    "per mask) and OUT/<image name>/masks.json (the records without the masks; RLEs with "
    "--rle) and prints the JSON paths.",
    example="samref amg --checkpoint tiny --image samref_jax/assets/examples/"
    "blob_on_stripes.png \\\n      --points-per-side 8 --pred-iou-thresh 0 "
    "--stability-score-offset 0.05 --stability-score-thresh 0.8 \\\n      --out out/amg"
    "   # low thresholds for the tiny bundled SAM; the defaults suit vit_b/l/h",
)
register("eval", "NoC evaluation on a dataset (RITM protocol), resumable", forward=_forward_eval)
register("compare", "merge evaluation runs into one table and plot", forward=_forward_compare)
register(
    "prepare-coco",
    "convert COCO/LVIS instance JSON + images to training records (sharded)",
    forward=_forward_prepare_coco,
)
register("train", "train a model from a config file (ml_collections)", forward=_forward_train)
register(
    "cache-embeddings",
    "cache frozen-encoder image embeddings for training",
    forward=_forward_cache_embeddings,
)
register(
    "launch-local",
    "run training as N local processes joined by jax.distributed",
    forward=_forward_launch_local,
)
register(
    "demo",
    "start the interactive browser demo (Gradio; needs the demo extra)",
    _configure_demo,
    _run_demo,
    description="Local web app: upload an image, click (left: object, toggle/right-click: "
    "background), undo, reset, switch sam/full, download the mask.",
    example="samref demo --checkpoint tiny --port 7860   # then open http://127.0.0.1:7860",
    aliases=("demo-app",),
)
register(
    "export",
    "write the model as jax.export programs that serve without this package",
    _configure_export,
    _run_export,
    description="Serialize the model for serving: OUT/prepare.jax (per image) and "
    "OUT/click.jax (per click), jax.export programs taking the parameters of OUT/params.npz, "
    "and OUT/manifest.json (inputs, outputs, the host pre/post-processing recipe). They run "
    "with jax and NumPy only: examples/serve_exported.py; docs/design.md, 'Serialized export'.",
    example="samref export --checkpoint tiny --out exported/tiny\n"
    "  python examples/serve_exported.py exported/tiny samref_jax/assets/examples/"
    "blob_on_stripes.png \\\n      --click 125,100,+ --out mask.png",
)


# ---------------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``PROG: error: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Wraps a paragraph, but keeps text with line breaks (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    """The ``samref`` parser with one subparser per registered command.

    A ``forward`` command's subparser only lists it: :func:`main` hands its arguments, ``--help``
    included, to the command's own parser."""
    parser = _Parser(
        prog="samref",
        description="SAM-REF interactive segmentation (JAX).",
        epilog="'samref COMMAND --help' shows a command's options and an example.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        if cmd.forward is not None:
            sub.add_parser(cmd.name, help=cmd.help, aliases=cmd.aliases, add_help=False)
            continue
        sp = sub.add_parser(
            cmd.name,
            help=cmd.help,
            aliases=cmd.aliases,
            description=cmd.description or cmd.help,
            epilog=f"example:\n  {cmd.example}" if cmd.example else None,
            formatter_class=_Formatter,
        )
        if cmd.configure is not None:
            cmd.configure(sp)
        sp.set_defaults(_command=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``samref``; returns the exit status (2 on user errors)."""
    from samref_jax.host import tune_malloc

    tune_malloc()  # before JAX starts its threads (samref_jax/host.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = _lookup(argv[0]) if argv else None
    if cmd is None or cmd.forward is None:
        args = build_parser().parse_args(argv)
        cmd = args._command
    try:
        if cmd.forward is not None:
            return int(cmd.forward(argv[1:], f"samref {cmd.name}") or 0)
        return int(cmd.run(args) or 0)
    except (CliError, LoadError) as e:
        print(f"samref {cmd.name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        print(f"samref {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
