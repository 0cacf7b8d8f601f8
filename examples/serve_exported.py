"""Segment an image with a SAM-REF export (``samref export``), without samref_jax.

Needs only jax, NumPy and Pillow: this is what a server does with the exported artifacts
(params.npz, prepare.jax, click.jax, manifest.json; docs/design.md, "Serialized export").

    samref export --checkpoint tiny --out exported/tiny
    python examples/serve_exported.py exported/tiny \\
        samref_jax/assets/examples/blob_on_stripes.png \\
        --click 125,100,+ --click 120,215,- --out mask.png

Writes the final mask after the last click as a 0/255 PNG of the image's size and prints one
line per click (mask coverage, SAM's score, PatchDiff's window in image pixels).
``--save-logits FILE.npz`` also writes every click's frame logits (``frame_logits``, (clicks,
F, F) float32) and the last click's logits at the image's size (``logits``, (H, W)).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image


class Exported:
    """The two programs of an export directory, their parameters and manifest."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.manifest = m = json.loads((directory / "manifest.json").read_text())
        if m.get("format") != "samref-jax-export":
            raise ValueError(f"{directory} holds no samref export (manifest format)")
        with np.load(directory / m["params"]["file"], allow_pickle=False) as npz:
            # Loaded to the device once; every call takes them first.
            self.params = [jax.device_put(npz[a["name"]]) for a in m["params"]["arrays"]]
        self.prepare_fn = self._load(directory / m["prepare"]["file"])
        self.click_fn = self._load(directory / m["click"]["file"])
        self.size = int(m["frame_size"])
        self.scale = int(m["image_scale"])

    @staticmethod
    def _load(path: Path) -> jax.export.Exported:
        return jax.export.deserialize(bytearray(path.read_bytes()))

    # ------------------------------------------------------------------ host pre-processing
    def _frame(self, image: np.ndarray, long_side: int) -> tuple[np.ndarray, tuple[int, int]]:
        """HxWx3 uint8 -> (1, S, S, 3) float32 normalised, zero-padded frame and (h, w)."""
        big_h, big_w = image.shape[:2]
        s = long_side * 1.0 / max(big_h, big_w)
        h, w = int(big_h * s + 0.5), int(big_w * s + 0.5)
        resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        mean = np.asarray(self.manifest["pixel_mean"], np.float32)
        std = np.asarray(self.manifest["pixel_std"], np.float32)
        out = np.zeros((1, long_side, long_side, 3), np.float32)
        out[0, :h, :w] = (resized.astype(np.float32) - mean) / std
        return out, (h, w)

    def prepare(self, image: np.ndarray) -> dict:
        """One image (HxWx3 uint8 RGB) -> its context and sizes, for :meth:`click`."""
        f = self.size
        frame, (h, w) = self._frame(image, f)
        big_h, big_w = image.shape[:2]
        radius = np.asarray([self.manifest["click_radius"] * f / max(big_h, big_w)], np.float32)
        args = [frame, np.asarray([[h, w]], np.int32), radius]
        if self.scale > 1:  # PatchDiff's image source: the original at k x the frame
            args.append(self._frame(image, self.scale * f)[0])
        context = self.prepare_fn.call(*self.params, *args)
        return {"context": context, "input_hw": (h, w), "original_hw": (big_h, big_w)}

    def empty_state(self) -> tuple[np.ndarray, ...]:
        """The click state before the first click (B = 1)."""
        m = self.manifest
        n, lr, f = int(m["max_clicks"]), int(m["low_res_size"]), self.size
        return (
            np.zeros((1, n, 2), np.float32),  # coords
            np.full((1, n), -1, np.int32),  # labels
            np.zeros((1,), np.int32),  # num_clicks
            np.zeros((1, lr, lr), np.float32),  # prev_low_res
            np.zeros((1,), bool),  # has_prev
            np.full((1, f, f), m["first_prev_logit"], np.float32),  # prev_logits
        )

    def click(self, image: dict, state: tuple, x: float, y: float, positive: bool) -> tuple:
        """One click at (x, y) image pixels -> (final frame logits (F, F), score, window in
        frame pixels, next state)."""
        (h, w), (big_h, big_w) = image["input_hw"], image["original_hw"]
        xy = np.array([[x * (w / big_w), y * (h / big_h)]], np.float64).astype(np.float32)
        label = np.asarray([1 if positive else 0], np.int32)
        out = self.click_fn.call(*self.params, *image["context"], *state, xy, label)
        final, _sam, score, window = out[:4]
        return np.asarray(final)[0], float(np.asarray(score)[0]), np.asarray(window)[0], out[4:]


# ---------------------------------------------------------------------- host post-processing
def _weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch bilinear (align_corners=False) source indices and weights along one axis."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _lerp(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    if x.shape[axis] == n_out:
        return x
    i0, i1, w1 = _weights(x.shape[axis], n_out)
    shape = [1, 1]
    shape[axis] = n_out
    w1 = w1.reshape(shape)
    a, b = np.take(x, i0, axis=axis), np.take(x, i1, axis=axis)
    return a * (np.float32(1) - w1) + b * w1


def to_original(frame_logits: np.ndarray, input_hw: tuple, original_hw: tuple) -> np.ndarray:
    """(F, F) frame logits -> (H, W): crop the padding, bilinear resize (columns first when
    the width grows)."""
    (h, w), (big_h, big_w) = input_hw, original_hw
    x = frame_logits[:h, :w].astype(np.float32)
    if big_w > w:
        return _lerp(_lerp(x, big_w, 1), big_h, 0)
    return _lerp(_lerp(x, big_h, 0), big_w, 1)


def _parse_click(spec: str) -> tuple[float, float, bool]:
    parts = [p.strip() for p in spec.split(",")]
    sign = parts[2] if len(parts) == 3 else "+"
    if len(parts) not in (2, 3) or sign not in ("+", "-"):
        raise argparse.ArgumentTypeError(f"malformed click {spec!r}: expected X,Y,+ or X,Y,-")
    try:
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed click {spec!r}: X and Y are numbers") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"click {spec!r} is not finite")
    return x, y, sign == "+"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Segment an image with a SAM-REF export (jax, NumPy, Pillow only)."
    )
    parser.add_argument("export", help="folder written by 'samref export'")
    parser.add_argument("image", help="image file (any format Pillow reads)")
    parser.add_argument(
        "--click",
        type=_parse_click,
        action="append",
        required=True,
        metavar="X,Y,SIGN",
        help="click in image pixels, SIGN + or -; repeat",
    )
    parser.add_argument("--out", required=True, help="mask PNG to write (0/255)")
    parser.add_argument("--save-logits", help="also write the logits to this .npz")
    args = parser.parse_args(argv)

    model = Exported(args.export)
    image = np.asarray(Image.open(args.image).convert("RGB"))
    big_h, big_w = image.shape[:2]
    for i, (x, y, _) in enumerate(args.click, start=1):
        if not (0 <= x < big_w and 0 <= y < big_h):
            parser.error(f"click {i} ({x:g}, {y:g}) is outside the {big_w}x{big_h} image")
    if len(args.click) > int(model.manifest["max_clicks"]):
        parser.error(f"at most {model.manifest['max_clicks']} clicks")

    prepared = model.prepare(image)
    state = model.empty_state()
    frames = []
    (h, w) = prepared["input_hw"]
    for i, (x, y, positive) in enumerate(args.click, start=1):
        final, score, window, state = model.click(prepared, state, x, y, positive)
        frames.append(final)
        mask = to_original(final, (h, w), (big_h, big_w)) > 0
        win = [
            window[0] * big_w / w,
            window[1] * big_h / h,
            window[2] * big_w / w,
            window[3] * big_h / h,
        ]
        print(
            f"click {i} ({x:g}, {y:g}, {'+' if positive else '-'}): mask "
            f"{100 * mask.mean():.1f}%, score {score:.3f}, window "
            f"({', '.join(f'{v:.0f}' for v in win)})"
        )
    logits = to_original(frames[-1], (h, w), (big_h, big_w))
    Image.fromarray(np.where(logits > 0, 255, 0).astype(np.uint8)).save(args.out)
    if args.save_logits:
        np.savez(args.save_logits, frame_logits=np.stack(frames), logits=logits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
