"""Serialized export: SAM-REF as two ``jax.export`` programs that run without this package.

``export_model(checkpoint, out_dir)`` (``samref export``) writes ``out_dir`` with::

  params.npz     the parameters, one array per leaf (NumPy ``.npz``), in the programs' order
  prepare.jax    the per-image step (SamRef.prepare): *params, frame, valid_hw, radius[, detail]
                 -> the image's ImageContext as a flat tuple of arrays
  click.jax      one interaction round (ClickState.add_click + SamRef.click of one mode):
                 *params, *context, *state, xy, label
                 -> final_logits, sam_logits, score, window, *next_state
  manifest.json  sizes, normalisation, every input and output of both programs in order (name,
                 shape, dtype), the host pre/post-processing recipe, the checkpoint identity

A server needs only ``jax`` and NumPy (``examples/serve_exported.py`` is a complete client)::

  params = [npz[a["name"]] for a in manifest["params"]["arrays"]]
  prepare = jax.export.deserialize(bytearray(open("prepare.jax", "rb").read()))
  context = prepare.call(*params, frame, valid_hw, radius)

The parameters are arguments of the programs, not constants baked into them: a server holds
one copy on the device for both programs, and the programs compute exactly what the library's
jitted predictor computes (XLA folds constant weights into different float operations; with
the weights as arguments the exported click's final logits equal ``SamRefPredictor``'s bit for
bit, tests/test_export.py). The batch dimension B is symbolic (one program for every batch
size) in every array except SAM's positional encoding (1, S, S, D). The programs are lowered
for the given platforms (default: the exporting process's backend; ``("cpu", "cuda")`` for
both).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from samref_jax.samref.config import MODES, sam_config_from
from samref_jax.samref.model import ClickState, ImageContext, SamRef, detail_scale

__all__ = [
    "ARTIFACTS",
    "CLICK_OUTPUTS",
    "EXPORT_FORMAT",
    "STATE_FIELDS",
    "ExportError",
    "check_export_directory",
    "export_model",
]

EXPORT_FORMAT = "samref-jax-export"
EXPORT_FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16")
# The state arrays of click.jax, in order (ClickState's fields).
STATE_FIELDS = ClickState._fields
# click.jax's outputs before the next state arrays.
CLICK_OUTPUTS = ("final_logits", "sam_logits", "score", "window")
ARTIFACTS = ("params.npz", "prepare.jax", "click.jax", "manifest.json")

# How a server uses the artifacts, recorded in the manifest (the words of docs/design.md).
RECIPE = {
    "image": (
        "Decode the image as H x W x 3 uint8 RGB (drop alpha, repeat grey). Scale its longest "
        "side to the frame F: s = F / max(H, W), h = int(H * s + 0.5), w = int(W * s + 0.5); "
        "resize to w x h with Pillow Image.resize((w, h), Image.BILINEAR)."
    ),
    "frame": (
        "frame = (resized.astype(float32) - pixel_mean) / pixel_std (float32 arithmetic), "
        "zero-padded at the bottom and right to F x F: array (1, F, F, 3) float32; batch "
        "images along the first axis."
    ),
    "detail": (
        "Only when image_scale k > 1: the same from the ORIGINAL image at the long side k * F "
        "(resize, normalise, pad to kF x kF): input 'detail' (1, kF, kF, 3) float32."
    ),
    "valid_hw": "int32 (1, 2) = [[h, w]], the resized image's size inside the frame.",
    "radius": "float32 (1,) = click_radius * F / max(H, W), the click-disk radius in frame px.",
    "params": (
        "params = the arrays of params.npz in the order of manifest params.arrays; every "
        "program call takes them first (load them to the device once)."
    ),
    "prepare": (
        "context = prepare(*params, frame, valid_hw, radius[, detail]): once per image; keep "
        "the outputs (context arrays, in the order listed) for its clicks."
    ),
    "state": (
        "Before the first click: coords zeros (B, N, 2) float32; labels -1 (B, N) int32; "
        "num_clicks zeros (B,) int32; prev_low_res zeros (B, L, L) float32; has_prev False "
        "(B,) bool; prev_logits first_prev_logit (B, F, F) float32 (N = max_clicks)."
    ),
    "click": (
        "A click at (x, y) original pixels: xy = [[x * w / W, y * h / H]] float32 (B, 2) "
        "frame pixels (computed in float64, then cast), label [1] positive / [0] negative "
        "int32 (B,). outputs = click(*params, *context, *state, xy, label); the next state is the "
        "outputs after the first four, passed to the next click unchanged (undo: keep the "
        "previous state). At most max_clicks clicks per object (a further click is not recorded)."
    ),
    "postprocess": (
        "final_logits (B, F, F): crop [:, :h, :w], resize to H x W bilinearly like torch "
        "interpolate(align_corners=False, no antialias): along each axis src = (i + 0.5) * "
        "in / out - 0.5 clamped at 0, i0 = min(floor(src), in - 1), i1 = min(i0 + 1, in - 1), "
        "w1 = float32(src - i0), value = a * (1 - w1) + b * w1 in float32; the columns first "
        "when W > w, else the rows first. mask = logits > 0."
    ),
    "window": (
        "window (B, 4) = PatchDiff's (x0, y0, x1, y1) in frame pixels (zeros unless mode "
        "'full'); original pixels: x * W / w, y * H / h."
    ),
}


class ExportError(ValueError):
    """A user error of the export (output folder, mode, dtype): a one-line message."""


def _is_export(directory: Path) -> bool:
    try:
        return json.loads((directory / "manifest.json").read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_export_directory(directory: str | os.PathLike, force: bool = False) -> Path:
    """Raises :class:`ExportError` unless ``directory`` may receive an export.

    A missing or empty folder is fine; one holding an earlier export only with ``force``
    (replaced as a whole); a file, or a non-empty folder that holds no export, never
    (replacing it would delete files that are not ours)."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"--out {directory} exists and is not a folder")
    if not directory.is_dir() or not any(directory.iterdir()):
        return directory
    if not _is_export(directory):
        raise ExportError(
            f"--out {directory} is not empty and holds no samref export: refusing to replace "
            "it, even with --force (choose a new or empty folder)"
        )
    if not force:
        raise ExportError(f"--out {directory} already holds an export (pass --force to replace it)")
    return directory


def _key_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as ``a.b.c`` (NamedTuple fields, dict keys, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _spec(name: str, aval: Any) -> dict[str, Any]:
    return {
        "name": name,
        "shape": [d if isinstance(d, int) else str(d) for d in aval.shape],
        "dtype": str(aval.dtype),
    }


def _checkpoint_identity(
    name_or_path: str | os.PathLike,
    meta: dict[str, Any],
    names: Sequence[str],
    values: Sequence[np.ndarray],
) -> dict[str, Any]:
    """What the export was made from: the checkpoint as given, its model type and training,
    and the SHA-256 of its parameters (each array's name, dtype, shape and bytes, in order;
    the same parameters give the same digest, from any checkpoint format or location)."""
    digest = hashlib.sha256()
    for name, value in zip(names, values, strict=True):
        value = np.ascontiguousarray(value)
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(value.tobytes())
    training = meta.get("training") or {}
    return {
        "checkpoint": os.fspath(name_or_path),
        "params_sha256": digest.hexdigest(),
        "model_type": meta.get("model_type"),
        "training_mode": training.get("mode"),
        "training_steps": training.get("steps"),
    }


def build_functions(
    params: Any,
    config: ml_collections.ConfigDict,
    mode: str = "full",
    dtype: Any = jnp.float32,
) -> tuple[Callable[..., tuple], Callable[..., tuple], Any]:
    """The two exported functions over flat arrays, parameters first.

    Args:
      params: the parameter tree (its leaves, in ``jax.tree_util`` order, are the first
        arguments of both functions; only their shapes and dtypes are used here).
      config: the SAM-REF model config; mode: the click's mode; dtype: the compute dtype.

    Returns:
      ``(prepare, click, context)``: ``prepare(*params, frame, valid_hw, radius[, detail])``
      -> the ImageContext's leaves; ``click(*params, *context, *state, xy, label)`` ->
      ``(final_logits, sam_logits, score, window, *next_state)``; ``context``: the
      ImageContext of ``jax.ShapeDtypeStruct`` at B = 1 (the order and names of its leaves).
    """
    cfg = ml_collections.FrozenConfigDict(config)
    model = SamRef(cfg, dtype)
    k = detail_scale(cfg)
    leaves, params_tree = jax.tree_util.tree_flatten(params)
    n_params = len(leaves)

    def variables(args: Sequence[Any]) -> dict[str, Any]:
        return {"params": jax.tree_util.tree_unflatten(params_tree, args[:n_params])}

    def context(*args) -> ImageContext:
        frame, valid_hw, radius, *detail = args[n_params:]
        return model.apply(
            variables(args),
            frame,
            valid_hw,
            radius,
            detail_image=detail[0] if detail else None,
            method=SamRef.prepare,
        )

    def prepare(*args) -> tuple:
        return tuple(jax.tree_util.tree_leaves(context(*args)))

    blank = jax.eval_shape(lambda: ImageContext.blank(cfg))  # shapes only: nothing runs
    images = [blank.image, blank.valid_hw, blank.radius] + ([blank.detail_image] if k > 1 else [])
    param_specs = [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in leaves]
    shapes = jax.eval_shape(context, *param_specs, *images)
    context_tree = jax.tree_util.tree_structure(shapes)
    n_ctx, n_state = context_tree.num_leaves, len(STATE_FIELDS)

    def click(*args) -> tuple:
        rest = args[n_params:]
        ctx = jax.tree_util.tree_unflatten(context_tree, rest[:n_ctx])
        state = ClickState(*rest[n_ctx : n_ctx + n_state])
        xy, label = rest[n_ctx + n_state :]
        state = state.add_click(xy, label)
        out, nxt = model.apply(variables(args), ctx, state, mode, method=SamRef.click)
        return (out.final_logits, out.sam_logits, out.score, out.window, *nxt)

    return prepare, click, shapes


def export_model(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    mode: str = "full",
    dtype: Any = jnp.float32,
    *,
    force: bool = False,
    platforms: Sequence[str] | None = None,
    symbolic_batch: bool = True,
) -> Path:
    """Writes ``prepare.jax``, ``click.jax`` and ``manifest.json`` of ``checkpoint`` to
    ``out_dir`` (module docstring; the calling convention: the manifest and docs/design.md).

    Args:
      checkpoint: a checkpoint directory or a bundled name (``tiny``, ``tiny-sam``).
      out_dir: the output folder: missing or empty, or anything with ``force`` (replaced as a
        whole). Written into a hidden sibling folder first, then renamed into place: a killed
        export leaves the previous content.
      mode: "sam", "global" or "full" (the click program's refiners).
      dtype: compute dtype, float32 or bfloat16 (parameters stay float32; the inputs are
        float32 either way; output dtypes are listed in the manifest).
      platforms: lowering platforms (e.g. ``("cpu", "cuda")``); None: this process's backend.
      symbolic_batch: B symbolic (one program for any batch size); False: B = 1.

    Returns:
      The absolute output folder.
    """
    from samref_jax.checkpoint import _move_into_place
    from samref_jax.samref.io import load_samref

    if mode not in MODES:
        raise ExportError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    dtype_name = str(jnp.dtype(dtype).name) if not isinstance(dtype, str) else dtype
    if dtype_name not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    out = check_export_directory(out_dir, force)

    params, config, meta = load_samref(checkpoint)
    cfg = ml_collections.FrozenConfigDict(config)
    sc = sam_config_from(cfg)
    f, k = sc.img_size, detail_scale(cfg)
    prepare, click, ctx_shapes = build_functions(params, cfg, mode, jnp.dtype(dtype_name))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    param_names = [_key_name(path) for path, _ in flat]
    param_values = [np.asarray(v) for _, v in flat]
    if len(set(param_names)) != len(param_names):
        raise AssertionError("two parameters share a name in the flat parameter list")
    param_specs = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in param_values]

    (b,) = jax.export.symbolic_shape("B") if symbolic_batch else (1,)
    f32, i32 = jnp.float32, jnp.int32
    prep_names = ["frame", "valid_hw", "radius"] + (["detail"] if k > 1 else [])
    prep_specs = [
        jax.ShapeDtypeStruct((b, f, f, 3), f32),
        jax.ShapeDtypeStruct((b, 2), i32),
        jax.ShapeDtypeStruct((b,), f32),
    ] + ([jax.ShapeDtypeStruct((b, k * f, k * f, 3), f32)] if k > 1 else [])
    prep_exp = jax.export.export(jax.jit(prepare), platforms=platforms)(*param_specs, *prep_specs)

    ctx_names = [_key_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(ctx_shapes)[0]]
    state_specs = [
        jax.ShapeDtypeStruct((b, *v.shape[1:]), v.dtype)
        for v in jax.eval_shape(lambda: ClickState.empty(cfg))
    ]
    click_names = ctx_names + list(STATE_FIELDS) + ["xy", "label"]
    click_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in prep_exp.out_avals]
    click_specs += state_specs
    click_specs += [jax.ShapeDtypeStruct((b, 2), f32), jax.ShapeDtypeStruct((b,), i32)]
    click_exp = jax.export.export(jax.jit(click), platforms=platforms)(*param_specs, *click_specs)
    click_out_names = list(CLICK_OUTPUTS) + [f"next_{n}" for n in STATE_FIELDS]
    n_params = len(param_specs)

    def specs(names: Sequence[str], avals: Sequence[Any]) -> list[dict[str, Any]]:
        return [_spec(n, a) for n, a in zip(names, avals, strict=True)]

    manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "calling_convention_version": prep_exp.calling_convention_version,
        "platforms": list(prep_exp.platforms),
        "checkpoint": _checkpoint_identity(checkpoint, meta, param_names, param_values),
        "mode": mode,
        "dtype": dtype_name,
        "batch": "B" if symbolic_batch else 1,
        "frame_size": f,
        "image_scale": k,
        "low_res_size": int(sc.low_res_mask_size),
        "pixel_mean": [float(v) for v in sc.pixel_mean],
        "pixel_std": [float(v) for v in sc.pixel_std],
        "click_radius": float(cfg.click_radius),
        "max_clicks": int(cfg.max_clicks),
        "first_prev_logit": float(cfg.first_prev_logit),
        "params": {
            "file": "params.npz",
            "count": n_params,
            "arrays": specs(param_names, param_specs),
        },
        "prepare": {
            "file": "prepare.jax",
            "inputs": specs(prep_names, prep_exp.in_avals[n_params:]),
            "outputs": specs(ctx_names, prep_exp.out_avals),
        },
        "click": {
            "file": "click.jax",
            "inputs": specs(click_names, click_exp.in_avals[n_params:]),
            "outputs": specs(click_out_names, click_exp.out_avals),
        },
        "recipe": RECIPE,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with open(staging / "params.npz", "wb") as fh:
            np.savez(fh, **dict(zip(param_names, param_values, strict=True)))
        (staging / "prepare.jax").write_bytes(prep_exp.serialize())
        (staging / "click.jax").write_bytes(click_exp.serialize())
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
