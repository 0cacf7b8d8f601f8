"""The ``samref`` command line (also ``python -m samref_jax.cli``).

Segment an image from a few clicks::

    samref segment photo.jpg --click 120,80,+ --click 60,40,- --out out/   # writes
    # out/mask.png (0/255, the image's size) and out/overlay.png (mask, clicks, PatchDiff window)

Start the browser demo (needs the ``demo`` extra: ``pip install 'samref-jax[demo]'``)::

    samref demo-app --checkpoint tiny --port 7860

``--checkpoint`` takes a checkpoint directory (SAM-REF, or SAM-only from ``convert_weights.py``)
or a bundled model name (``tiny``, ``tiny-sam``); the default is ``tiny``.

User errors (a missing or unreadable image, a malformed click, a click outside the image, a
missing checkpoint) print one line ``samref <command>: error: ...`` on stderr and exit with
status 2, without a traceback.

Subcommands live in a small registry: add one with :func:`register` (a ``configure(parser)``
that adds its arguments and a ``run(args) -> int``); :func:`main` builds the argparse
subparsers from it.
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
BUNDLED_NAMES = ("tiny", "tiny-sam")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``configure`` adds its arguments, ``run`` executes it (exit status)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


COMMANDS: dict[str, Command] = {}


def register(
    name: str,
    help: str,  # noqa: A002  argparse's word
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    description: str | None = None,
) -> Command:
    """Add (or replace) the subcommand ``name``."""
    cmd = Command(name, help, configure, run, description)
    COMMANDS[name] = cmd
    return cmd


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
        raise CliError(f"cannot read {p} as an image ({_short(e)})") from None
    except Exception as e:  # Pillow raises a few non-OSError types (e.g. decompression bombs)
        raise CliError(f"cannot read {p} as an image ({type(e).__name__}: {_short(e)})") from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[-1] if text else type(e).__name__
    # DataError repeats the path; keep the reason only.
    return text.split(": ", 1)[-1] if text.startswith("cannot decode") else text


def check_checkpoint(name_or_path: str) -> None:
    """Fail early (before importing JAX) when a checkpoint directory or bundled name is missing."""
    if name_or_path in BUNDLED_NAMES:
        from samref_jax.checkpoint import CheckpointError
        from samref_jax.model.io import resolve_checkpoint

        try:
            resolve_checkpoint(name_or_path)
        except CheckpointError as e:
            raise CliError(
                f"{e} (train it, or pass a checkpoint directory with --checkpoint DIR)"
            ) from None
        return
    p = Path(name_or_path)
    if not p.exists():
        raise CliError(
            f"checkpoint not found: {p} (give a checkpoint directory or a bundled name: "
            f"{', '.join(BUNDLED_NAMES)})"
        )
    if not p.is_dir():
        raise CliError(f"checkpoint is not a directory: {p}")


def load_predictor(name_or_path: str, mode: str = "full"):
    """``SamRefPredictor.from_checkpoint`` with checkpoint errors turned into :class:`CliError`."""
    check_checkpoint(name_or_path)
    from samref_jax.checkpoint import CheckpointError
    from samref_jax.model.predictor import SamRefPredictor

    try:
        return SamRefPredictor.from_checkpoint(name_or_path, mode=mode)
    except CheckpointError as e:
        raise CliError(f"cannot load checkpoint {name_or_path}: {_short(e)}") from None


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
    p.add_argument("--out", required=True, help="output folder (created if needed)")


def _run_segment(args: argparse.Namespace) -> int:
    clicks = [parse_click(c) for c in args.click]
    if not clicks:
        raise CliError("give at least one click, e.g. --click 120,80,+")
    image = read_image_or_fail(args.image)
    h, w = image.shape[:2]
    check_clicks_inside(clicks, w, h)
    out = check_out_folder(args.out)
    predictor = load_predictor(args.checkpoint, args.mode)

    from samref_jax import viz

    try:
        predictor.set_image(image)
        result = None
        for x, y, positive in clicks:
            result = predictor.click(x, y, positive=positive)
    except ValueError as e:
        raise CliError(str(e)) from None
    mask_path, overlay_path = out / "mask.png", out / "overlay.png"
    try:
        out.mkdir(parents=True, exist_ok=True)
        viz.mask_image(result.mask).save(mask_path)
        viz.overlay(image, result.mask, clicks, result.window).save(overlay_path)
    except OSError as e:  # e.g. the disk filled up, or permissions changed meanwhile
        raise CliError(f"cannot write to --out {out}: {e.strerror or e}") from None
    window = "none"
    if result.window is not None:
        window = "(" + ", ".join(f"{v:.0f}" for v in result.window) + ")"
    print(
        f"samref segment: {len(clicks)} click(s), mode {args.mode}, mask covers "
        f"{100 * result.mask.mean():.1f}% of {w}x{h}, SAM score {result.score:.3f}, "
        f"PatchDiff window {window}",
        file=sys.stderr,
    )
    print(mask_path)
    print(overlay_path)
    return 0


# ---------------------------------------------------------------------------------- demo-app
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


register(
    "segment",
    "segment an image from clicks; write mask.png and overlay.png",
    _configure_segment,
    _run_segment,
    description="Segment IMAGE with SAM-REF from the given clicks. Writes OUT/mask.png "
    "(0/255, the image's size) and OUT/overlay.png (mask, clicks, PatchDiff window) and prints "
    "their paths.",
)
register(
    "demo-app",
    "start the interactive browser demo (Gradio)",
    _configure_demo,
    _run_demo,
    description="Local web app: upload an image, click (left: object, toggle/right-click: "
    "background), undo, reset, switch sam/full, download the mask.",
)


# ---------------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``PROG: error: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``samref`` parser with one subparser per registered command."""
    parser = _Parser(prog="samref", description="SAM-REF interactive segmentation (JAX).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.configure(sp)
        sp.set_defaults(_command=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``samref``; returns the exit status (2 on user errors)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    cmd: Command = args._command
    try:
        return int(cmd.run(args) or 0)
    except CliError as e:
        print(f"samref {cmd.name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
