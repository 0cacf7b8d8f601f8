"""Official PyTorch SAM `state_dict` -> Flax parameter tree, strictly.

Every checkpoint tensor is used exactly once and every Flax parameter is filled, with shapes
checked; anything else raises `ConversionError` naming the offending keys. The model type is
detected from tensor shapes. Torch is only needed to read `.pth` files (`load_torch_state_dict`).

Layout rules: Linear (out, in) -> kernel (in, out); Conv2d (O, I, kh, kw) -> (kh, kw, I, O);
ConvTranspose2d (I, O, kh, kw) -> (kh, kw, I, O); LayerNorm weight -> scale; embeddings,
`pos_embed`, `rel_pos_*` and the Fourier matrix are copied as they are.

Example:
  >>> model_type, params = convert_state_dict(state_dict)   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from samref_jax.sam.config import SamConfig, sam_config
from samref_jax.sam.model import Sam

OFFICIAL_TYPES = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_EMBEDDINGS = ("point_embeddings", "not_a_point_embed", "no_mask_embed", "iou_token", "mask_tokens")


class ConversionError(ValueError):
    """The file or state_dict cannot be converted; the message says exactly why."""


def flax_path(torch_key: str) -> tuple[str, ...]:
    """Maps a torch state_dict key to the Flax parameter path (without layout change)."""
    parts = torch_key.split(".")
    out: list[str] = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    if out[:2] == ["image_encoder", "patch_embed"]:
        out = ["image_encoder", "patch_embed", out[-1]]  # drop ".proj"
    leaf = out[-1]
    parent = out[-2] if len(out) > 1 else ""
    if leaf == "weight":
        if any(parent.startswith(e) for e in _EMBEDDINGS):
            return tuple(out[:-1])
        out[-1] = "kernel"
    return tuple(out)


def _to_flax(
    key: str, path: tuple[str, ...], value: np.ndarray, target_shape: tuple[int, ...]
) -> np.ndarray:
    """Applies the layout change for one tensor (destination `path`), then checks the shape."""
    v = np.asarray(value)
    if path[-1] == "kernel" and v.ndim == 2:  # Linear
        v = v.T
    elif path[-1] == "kernel" and v.ndim == 4:  # Conv2d or ConvTranspose2d
        v = v.transpose(2, 3, 0, 1) if "output_upscaling" in key else v.transpose(2, 3, 1, 0)
    if tuple(v.shape) != tuple(target_shape):
        raise ConversionError(
            f"shape mismatch for {key!r}: checkpoint {tuple(np.shape(value))} gives "
            f"{tuple(v.shape)}, the model expects {tuple(target_shape)}"
        )
    return np.ascontiguousarray(v, dtype=np.float32)


def _layer_norm_fix(path: tuple[str, ...], flat_shapes: Mapping[tuple[str, ...], Any]):
    """LayerNorm 'weight' becomes 'scale' (not 'kernel') when the module is a LayerNorm."""
    if path[-1] == "kernel" and path not in flat_shapes:
        alt = path[:-1] + ("scale",)
        if alt in flat_shapes:
            return alt
    return path


def detect_model_type(state_dict: Mapping[str, Any]) -> str:
    """vit_b / vit_l / vit_h from the patch-embedding width; raises if not SAM."""
    if _PATCH_KEY not in state_dict:
        sample = ", ".join(sorted(state_dict)[:5]) or "no keys"
        raise ConversionError(
            f"not a SAM checkpoint: key {_PATCH_KEY!r} is missing (first keys: {sample})"
        )
    width = int(np.shape(state_dict[_PATCH_KEY])[0])
    if width not in OFFICIAL_TYPES:
        raise ConversionError(
            f"not an official SAM v1 checkpoint: image encoder width {width} "
            f"(expected one of {sorted(OFFICIAL_TYPES)})"
        )
    return OFFICIAL_TYPES[width]


def expected_shapes(config: SamConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of the Flax parameter tree, computed without allocating."""
    shapes = jax.eval_shape(lambda: Sam(config).init(jax.random.key(0)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert_state_dict(
    state_dict: Mapping[str, Any],
    model_type: str | None = None,
    config: SamConfig | None = None,
) -> tuple[str, dict[str, Any]]:
    """Converts an official SAM state_dict (tensors or arrays) to (model_type, Flax params).

    `model_type` forces a type and must match the tensors; `config` converts a non-standard
    (e.g. small test) model of known architecture.
    """
    if config is None:
        detected = detect_model_type(state_dict)
        if model_type is not None and model_type != detected:
            raise ConversionError(
                f"--model-type {model_type} does not match the checkpoint, whose tensors are "
                f"{detected}"
            )
        model_type = detected
        config = sam_config(model_type)
    else:
        model_type = model_type or config.name
    shapes = expected_shapes(config)
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    nonfinite: list[str] = []
    for key, value in state_dict.items():
        path = _layer_norm_fix(flax_path(key), shapes)
        if path not in shapes:
            unexpected.append(key)
            continue
        if path in filled:
            raise ConversionError(
                f"two checkpoint tensors map to {'/'.join(path)} (one is {key!r})"
            )
        filled[path] = _to_flax(key, path, _as_numpy(value), shapes[path])
        if not np.isfinite(filled[path]).all():
            nonfinite.append(key)
    missing = sorted("/".join(p) for p in shapes if p not in filled)
    if unexpected or missing:
        msg = [f"state_dict does not match SAM {model_type}:"]
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected key(s): {', '.join(sorted(unexpected)[:8])}")
        if missing:
            msg.append(f"{len(missing)} missing parameter(s): {', '.join(missing[:8])}")
        raise ConversionError(" ".join(msg))
    if nonfinite:
        raise ConversionError(
            f"{len(nonfinite)} tensor(s) hold NaN or Inf values (a damaged or diverged "
            f"checkpoint): {', '.join(sorted(nonfinite)[:5])}"
        )
    tree: dict[str, Any] = {}
    for path, arr in filled.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr
    return model_type, tree


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if hasattr(value, "float"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _refusal_reason(text: str) -> str:
    """One line from torch's weights-only refusal, without its advice to disable the check."""
    found = re.search(r"unsupported GLOBAL (\S+)", text) or re.search(
        r"Unsupported global: GLOBAL (\S+)", text
    )
    if found:
        what = f"it asks to call or build {found.group(1)!r}"
    else:
        what = "it holds pickle instructions other than plain tensors"
    return (
        f"{what}, which a weights-only load does not run (nothing was executed); an official "
        "SAM checkpoint holds only tensors, so this file is not one or has been tampered with"
    )


def load_torch_state_dict(path: str | Path) -> dict[str, Any]:
    """Reads a `.pth` with `torch.load(weights_only=True)`: never runs pickled code."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConversionError(f"{str(path)!r} is not a file")
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "reading .pth files needs PyTorch: pip install 'samref-jax[torch]'"
        ) from None
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not for users
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
            raise ConversionError(f"{str(path)!r} was refused: {_refusal_reason(text)}") from None
        first = (text.strip().splitlines() or [""])[0][:200]
        raise ConversionError(
            f"{str(path)!r} is not a readable PyTorch checkpoint (truncated, corrupt or another "
            f"format): {type(e).__name__}: {first}"
        ) from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConversionError(f"{str(path)!r} does not hold a state_dict of tensors")
    return dict(obj)


def main(argv: list[str] | None = None, prog: str = "convert_weights.py") -> int:
    """`samref convert --checkpoint FILE.pth --output DIR [--model-type T] [--force]` (also
    `convert_weights.py` and `samref-convert`).

    A non-empty --output is refused unless it holds a checkpoint and --force is given; the new
    checkpoint is written beside it and renamed into place (a kill keeps the old one)."""
    import argparse
    import sys

    from tqdm import tqdm

    from samref_jax.checkpoint import CheckpointError, check_output_directory, save_model_checkpoint

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert an official SAM v1 .pth checkpoint to a samref-jax checkpoint\n"
        "(needs the torch extra: pip install -e '.[torch]').",
        epilog="example:\n"
        "  samref convert --checkpoint sam_vit_b_01ec64.pth --output checkpoints/vit_b",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="official sam_vit_*.pth file")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--model-type", choices=sorted(OFFICIAL_TYPES.values()), default=None)
    parser.add_argument(
        "--force", action="store_true", help="replace a checkpoint already in --output"
    )
    args = parser.parse_args(argv)
    try:
        check_output_directory(args.output, args.force)  # before the slow steps
        steps = tqdm(total=4, desc="convert", unit="step", disable=None)
        steps.set_postfix_str("sha256")
        digest = sha256_of(args.checkpoint) if Path(args.checkpoint).is_file() else ""
        steps.update()
        steps.set_postfix_str("torch.load")
        state_dict = load_torch_state_dict(args.checkpoint)
        steps.update()
        steps.set_postfix_str("mapping")
        model_type, params = convert_state_dict(state_dict, args.model_type)
        steps.update()
        steps.set_postfix_str("orbax save")
        save_model_checkpoint(
            args.output,
            {"sam": params},
            {
                "model_type": model_type,
                "sam_config": sam_config(model_type).__dict__,
                "source_file": Path(args.checkpoint).name,
                "source_sha256": digest,
                "num_tensors": len(state_dict),
            },
            overwrite=args.force,
        )
        steps.update()
        steps.close()
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for SIGINT
        print(f"{prog}: interrupted; --output was left as it was", file=sys.stderr)
        return 130
    print(f"wrote {model_type} checkpoint to {args.output}")
    return 0
