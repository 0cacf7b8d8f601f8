"""The NoC evaluation loop (RITM protocol) over a duck-typed click predictor.

Protocol and metrics: docs/design.md, 'Evaluation protocol'; outputs: docs/evaluation.md.

The predictor API (``samref_jax.samref.predictor.SamRefPredictor`` implements it)::

    p.set_image(image)               # uint8[H, W, 3]; computes the image embedding once
    out = p.click(x, y, positive)    # out.mask: bool[H, W] (an array or {"mask": ...} works too)
    p.reset()                        # clears clicks, keeps the embedding
    p.set_mode(mode)                 # optional, only for evaluate(..., modes=[...])
    q = p.fork(mode)                 # optional: another click loop on the same image
    e = p.prepare_image(image)       # optional: the embedding, current image and clicks kept;
    p.set_image(e)                   #   then set_image takes it (next image embedded ahead)
    p.set_mask(mask)                 # optional, only for evaluate(..., init_masks=DIR)

For every sample: ``set_image`` once, then up to ``max_clicks`` rounds of host click simulator
(:func:`samref_jax.interaction.clicker.next_click` on ``gt == 1`` with ``gt == -1`` ignored) ->
``click`` -> IoU. Early stop is off by default so full curves exist.

Mask correction (``evaluate(init_masks=DIR)``, FocalClick's DAVIS-585 protocol): each sample
starts from the mask ``DIR/<id>.png`` (nonzero = object; a missing or mis-sized one is a bad
sample): ``set_mask`` after ``reset``, the first click comes from the error between it and the
ground truth, and its IoU is the record's ``initial_iou`` (click 0; ``ious`` and NoC still
count clicks from 1).

Outputs under ``output_dir`` (or ``output_dir/<mode>`` per mode):

- ``samples.jsonl``: one line per finished sample (id, IoU curve, clicks, timings), appended as
  each sample finishes; a rerun skips the ids already there (resume).
- ``masks/``: final predicted mask of every sample (1-bit PNG), for the overlays after a resume.
- ``metrics.json``, ``metrics.md``, ``miou_curve.png``, ``overlays/worst_*.png``.

Several modes run at the same time by default when the predictor has ``fork(mode)`` (see
``evaluate(concurrent_modes=...)``); the records and metrics say so (``concurrent_modes``).
With ``prepare_image`` the next image is embedded in a background thread while the current
one is clicked (``evaluate(prefetch=...)``; metadata ``prefetch``). Neither changes a click
or an IoU.

Timing: ``seconds_per_click`` covers ``click`` plus fetching its mask to the host (not the click
simulator); with concurrent modes it includes waiting for the other modes' work.
``seconds_per_image_embedding`` covers ``set_image`` (with prefetch: ``prepare_image`` in the
background thread, slowed by the clicks it overlaps; ``embedding_wait_s`` is how long the loop
then waited for it). The first sample a process evaluates is a warm-up (jit compilation) and is
left out of both unless it is the only one.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samref_jax.evaluation import metrics as M
from samref_jax.evaluation import report
from samref_jax.interaction.clicker import ClickState
from samref_jax.paths import as_path

__all__ = ["ResumeError", "SampleError", "evaluate", "load_records", "run_sample"]

SAMPLES_FILE = "samples.jsonl"
FAILED_FILE = "failed.jsonl"
RUN_FILE = "run.json"


class ResumeError(ValueError):
    """An output folder cannot be resumed (damaged records, or made by another run)."""


class SampleError(ValueError):
    """One sample cannot be evaluated (unreadable or mis-sized files, an unusable image)."""


def strict_json(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value


def _as_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return _as_str(v.item())
    return str(v)


def _out_mask(out: Any) -> np.ndarray:
    if isinstance(out, Mapping):
        out = out["mask"]
    elif hasattr(out, "mask"):
        out = out.mask
    return np.asarray(out).astype(bool, copy=False)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def load_init_mask(folder: str | Path, sample_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The initial mask of one sample: ``folder/<sample_id>.png``, nonzero = object (any
    channel), as ``bool[H, W]``; :class:`SampleError` (one line) when missing, unreadable or not
    ``shape``."""
    path = as_path(folder) / f"{sample_id}.png"
    if not path.is_file():
        raise SampleError(f"no initial mask {path}")
    try:
        with path.open("rb") as fh:
            m = np.asarray(Image.open(fh))
    except Exception as e:
        raise SampleError(f"{path}: not a readable image ({type(e).__name__})") from None
    m = m.any(axis=-1) if m.ndim == 3 else m != 0
    if m.shape != tuple(shape):
        raise SampleError(f"initial mask {path} is {m.shape}, the image is {tuple(shape)}")
    return m


def run_sample(
    predictor: Any,
    image: np.ndarray,
    gt: np.ndarray,
    max_clicks: int = 20,
    stop_iou: float | None = None,
    embed: bool = True,
    init_mask: np.ndarray | None = None,
) -> tuple[dict, np.ndarray]:
    """Run the click loop on one sample.

    Args:
      predictor: see the module docstring.
      image: ``uint8[H, W, 3]``.
      gt: ``int8[H, W]``: 1 object, 0 background, -1 ignore.
      max_clicks: clicks per sample.
      stop_iou: stop once the IoU reaches this (``None``: never, full curves).
      embed: call ``set_image`` (``False``: the image is already set; only ``reset``).
      init_mask: ``bool[H, W]`` mask to correct (the predictor's ``set_mask``): the first click
        comes from its error, and the record gets its IoU as ``initial_iou``.

    Returns:
      ``(record, final_mask)``: record has ``ious``, ``clicks`` (``[y, x, positive]``),
      ``click_seconds`` and ``set_image_seconds`` (and ``initial_iou`` with ``init_mask``);
      ``final_mask`` is ``bool[H, W]``.
    """
    gt = np.asarray(gt)
    obj, ignore = gt == 1, gt == -1
    set_image_seconds = None
    if embed:
        t0 = time.perf_counter()
        predictor.set_image(image)
        set_image_seconds = time.perf_counter() - t0
    predictor.reset()
    pred = np.zeros(gt.shape, dtype=bool)
    initial_iou = None
    if init_mask is not None:
        pred = np.asarray(init_mask, dtype=bool)
        if pred.shape != gt.shape:
            raise ValueError(f"initial mask {pred.shape} does not match the image {gt.shape}")
        predictor.set_mask(pred)
        initial_iou = M.iou(pred, obj, ignore)
    state = ClickState(gt.shape)
    ious: list[float] = []
    click_seconds: list[float] = []
    clicker_seconds = 0.0
    for _ in range(max_clicks):
        t0 = time.perf_counter()
        click = state.next(obj, pred, ignore)
        t1 = time.perf_counter()
        out = predictor.click(click.x, click.y, positive=click.is_positive)
        mask = _out_mask(out)
        click_seconds.append(time.perf_counter() - t1)
        clicker_seconds += t1 - t0
        if mask.shape != gt.shape:
            raise ValueError(f"predictor returned a {mask.shape} mask for a {gt.shape} image")
        pred = mask
        ious.append(M.iou(pred, obj, ignore))
        if stop_iou is not None and ious[-1] >= stop_iou:
            break
    record = {
        "ious": ious,
        "clicks": [[c.y, c.x, int(c.is_positive)] for c in state.clicks],
        "click_seconds": click_seconds,
        "clicker_seconds": clicker_seconds,
        "set_image_seconds": set_image_seconds,
        "height": int(gt.shape[0]),
        "width": int(gt.shape[1]),
    }
    if initial_iou is not None:
        record["initial_iou"] = initial_iou
    return record, pred


def load_records(path: str | Path, repair: bool = True) -> dict[str, dict]:
    """Finished samples of ``samples.jsonl`` by id; drops a torn last line (interrupted write).

    Any other damaged line raises :class:`ResumeError` naming ``file:line``. ``repair=False``
    leaves the file as it is."""
    path = as_path(path)
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        if repair:
            path.write_bytes(raw)
    records = {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise ResumeError(f"{path}:{line_no}: not UTF-8 text; {_START_OVER}") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ResumeError(
                f"{path}:{line_no}: not a JSON record ({e.msg}); {_START_OVER}"
            ) from None
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("id"), str)
            or not isinstance(rec.get("index"), int)
        ):
            raise ResumeError(
                f"{path}:{line_no}: a record without an 'id' or 'index'; {_START_OVER}"
            )
        if not isinstance(rec.get("ious"), list) or not all(
            isinstance(v, int | float) and np.isfinite(v) for v in rec["ious"]
        ):
            raise ResumeError(
                f"{path}:{line_no}: record {rec['id']!r} has no IoU curve; {_START_OVER}"
            )
        records[rec["id"]] = rec
    return records


_START_OVER = "delete that line (the sample is evaluated again) or use a new output folder"


def run_folders(
    output_dir: str | Path | None,
    modes: Sequence[str] | None,
    identity: Mapping | None,
    mode: str | None,
    max_clicks: int,
    stop_iou: float | None,
) -> dict[str | None, tuple[Path | None, dict | None]]:
    """``{mode: (folder, identity)}`` of the runs of :func:`evaluate` (``None``: one mode)."""
    out = {}
    for m in list(modes) if modes else [None]:
        ident = None
        if identity is not None:
            ident = {**identity, "mode": m if m is not None else mode}
            ident.update(max_clicks=max_clicks, stop_iou=stop_iou)
        folder = None
        if output_dir is not None:
            folder = as_path(output_dir) if m is None else as_path(output_dir) / m
        out[m] = (folder, ident)
    return out


def check_resumable(folder: Path, identity: Mapping | None, max_clicks: int) -> None:
    """Raises :class:`ResumeError` if ``folder`` cannot take this run (cheap; writes nothing)."""
    if folder.exists() and not folder.is_dir():
        raise ResumeError(f"output {folder} exists and is not a folder")
    _Run._check_identity(folder, identity)
    for rec in load_records(folder / SAMPLES_FILE, repair=False).values():
        if rec.get("max_clicks", max_clicks) != max_clicks:
            raise ResumeError(
                f"{folder / SAMPLES_FILE} was written with max_clicks={rec.get('max_clicks')}, "
                f"not {max_clicks}; use another output folder"
            )


# Identity keys added after runs were written, at the value those runs had: a run.json without
# the key resumes with that value and is refused with another.
_IDENTITY_DEFAULTS = {"dtype": "float32", "init_masks": None}


def _identity_diff(old: Mapping, new: Mapping) -> list[str]:
    def get(d: Mapping, k: str) -> Any:
        return d.get(k, _IDENTITY_DEFAULTS.get(k))

    return sorted(k for k in set(old) | set(new) if get(old, k) != get(new, k))


class _Run:
    """Output folder of one (predictor, mode) run: the resumable JSONL and the masks."""

    def __init__(
        self, output_dir: Path | None, max_clicks: int, identity: Mapping | None = None
    ) -> None:
        self.dir = output_dir
        self.records: dict[str, dict] = {}
        self.failed: dict[str, dict] = {}
        self._fh = None
        self._failed_fh = None
        if output_dir is not None:
            if output_dir.exists() and not output_dir.is_dir():
                raise ResumeError(f"output {output_dir} exists and is not a folder")
            self._check_identity(output_dir, identity)
            self.records = load_records(output_dir / SAMPLES_FILE)
            for rec in self.records.values():
                if rec.get("max_clicks", max_clicks) != max_clicks:
                    raise ValueError(
                        f"{output_dir / SAMPLES_FILE} was written with max_clicks="
                        f"{rec.get('max_clicks')}, not {max_clicks}; use another output folder"
                    )
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "masks").mkdir(exist_ok=True)
            if identity is not None and not (output_dir / RUN_FILE).exists():
                text = json.dumps(strict_json(dict(identity)), indent=2, sort_keys=True)
                (output_dir / RUN_FILE).write_text(text + "\n")
            (output_dir / FAILED_FILE).unlink(missing_ok=True)  # failed samples are retried
            self._fh = (output_dir / SAMPLES_FILE).open("a", encoding="utf-8")  # noqa: SIM115

    @staticmethod
    def _check_identity(output_dir: Path, identity: Mapping | None) -> None:
        """Refuses a folder whose ``run.json`` describes another run (model, mode, protocol)."""
        path = output_dir / RUN_FILE
        if identity is None or not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ResumeError(f"{path} is damaged ({e}); use a new output folder") from None
        new = strict_json(dict(identity))
        if not isinstance(old, dict):
            raise ResumeError(f"{path} is damaged (not a JSON object); use a new output folder")
        diff = _identity_diff(old, new)
        if diff:
            shown = ", ".join(
                f"{k}: {old.get(k, _IDENTITY_DEFAULTS.get(k))!r} -> "
                f"{new.get(k, _IDENTITY_DEFAULTS.get(k))!r}"
                for k in diff[:4]
            )
            raise ResumeError(
                f"{output_dir} holds another run ({shown}); use a new output folder to "
                "evaluate this one"
            )

    def fail(self, index: int, sample_id: str, reason: str) -> None:
        """Records a sample that could not be evaluated (``failed.jsonl``, ``metrics.json``)."""
        rec = {"id": sample_id, "index": index, "reason": reason}
        self.failed[sample_id] = rec
        if self.dir is not None:
            if self._failed_fh is None:
                self._failed_fh = (self.dir / FAILED_FILE).open("a", encoding="utf-8")  # noqa: SIM115
            self._failed_fh.write(json.dumps(rec) + "\n")
            self._failed_fh.flush()

    def mask_path(self, index: int, sample_id: str) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / "masks" / f"{index:05d}_{_safe(sample_id)}.png"

    def add(self, rec: dict, mask: np.ndarray) -> None:
        self.records[rec["id"]] = rec
        if self._fh is not None:
            with self.mask_path(rec["index"], rec["id"]).open("wb") as fh:  # epath: gs://...
                Image.fromarray(mask).convert("1").save(fh, format="PNG")
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()

    def close(self) -> None:
        for fh in (self._fh, self._failed_fh):
            if fh is not None:
                fh.close()
        self._fh = self._failed_fh = None


def _stats(values: Sequence[float]) -> dict:
    if not len(values):
        return {"mean": None, "p50": None, "p95": None}
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "p50": float(np.percentile(v, 50)),
        "p95": float(np.percentile(v, 95)),
    }


def _timing(records: Sequence[dict]) -> dict:
    warm = [r for r in records if not r.get("warmup")] or list(records)
    clicks = [s for r in warm for s in r["click_seconds"]]
    embeds = [r["set_image_seconds"] for r in warm if r.get("set_image_seconds") is not None]
    all_embed = [r["set_image_seconds"] or 0.0 for r in records]
    waits = [r["embedding_wait_s"] for r in records if r.get("embedding_wait_s") is not None]
    return {
        "seconds_per_click": _stats(clicks),
        "seconds_per_image_embedding": float(np.mean(embeds)) if embeds else None,
        "timing": {
            "embedding_total_s": float(np.sum(all_embed)),
            "embedding_wait_total_s": float(np.sum(waits)) if waits else None,
            "click_total_s": float(sum(sum(r["click_seconds"]) for r in records)),
            "clicker_total_s": float(sum(r.get("clicker_seconds", 0.0) for r in records)),
            "num_clicks": int(sum(len(r["click_seconds"]) for r in records)),
            "warmup_samples_excluded": len(records) - len(warm),
        },
    }


def _environment() -> dict:
    env = {"python": platform.python_version(), "host": platform.node()}
    try:
        import jax

        env.update(
            jax=jax.__version__,
            backend=jax.default_backend(),
            devices=[str(d.device_kind) for d in jax.local_devices()],
        )
    except Exception:  # pragma: no cover - informational only
        pass
    return env


def _finish(
    run: _Run,
    ids: Sequence[str],
    samples: Sequence[Mapping],
    max_clicks: int,
    metadata: Mapping,
    num_overlays: int,
    loop_seconds: float,
) -> dict:
    records = [run.records[i] for i in ids if i in run.records]
    curves = [r["ious"] for r in records]
    out = {**M.summarize(curves, max_clicks), **_timing(records)}
    out["max_clicks"] = max_clicks
    initial = [r["initial_iou"] for r in records if r.get("initial_iou") is not None]
    if initial:  # mask correction: the mean IoU of the initial masks (click 0)
        out["initial_mIoU"] = float(np.mean(initial))
    out["complete"] = len(records) == len(ids)
    failed = [run.failed[i] for i in ids if i in run.failed]
    if failed:
        out["num_failed"] = len(failed)
        out["failed"] = [{"id": f["id"], "reason": f["reason"]} for f in failed]
    out["metadata"] = {
        **metadata,
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "loop_wall_s": loop_seconds,
        **_environment(),
    }
    if run.dir is None:
        return out
    out = strict_json(out)  # e.g. no sample finished: null, not NaN
    (run.dir / "metrics.json").write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    report.write_metrics_markdown(out, run.dir / "metrics.md")
    label = str(metadata.get("label") or metadata.get("mode") or "run")
    report.plot_miou(
        {label: out["mIoU@k"]},
        run.dir / "miou_curve.png",
        title=f"{metadata.get('dataset', '')} {label}".strip(),
    )
    _write_overlays(run, records, samples, num_overlays)
    return out


def _write_overlays(run: _Run, records: Sequence[dict], samples: Sequence, num: int) -> None:
    """Overlays of the worst samples (highest NoC@90, then lowest mean IoU)."""
    folder = run.dir / "overlays"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("worst_*.png"):
        old.unlink()
    max_clicks = max((len(r["ious"]) for r in records), default=0)
    ranked = sorted(
        records,
        key=lambda r: (
            -int(M.noc_per_sample([r["ious"]], 0.90, max(max_clicks, 1))[0]),
            float(np.mean(r["ious"])),
        ),
    )
    for rank, rec in enumerate(ranked[:num], start=1):
        mask_path = run.mask_path(rec["index"], rec["id"])
        if mask_path is None or not mask_path.exists():
            continue
        sample = samples[rec["index"]]
        if _as_str(sample["id"]) != rec["id"]:  # the dataset changed since the record was made
            continue
        with mask_path.open("rb") as fh:
            mask = np.asarray(Image.open(fh)).astype(bool)
        noc90 = int(M.noc_per_sample([rec["ious"]], 0.90, len(rec["ious"]))[0])
        title = f"{rec['id']}  final IoU {rec['ious'][-1]:.3f}  NoC@90 {noc90}"
        im = report.draw_overlay(
            np.asarray(sample["image"]), np.asarray(sample["gt"]), mask, rec["clicks"], title
        )
        with (folder / f"worst_{rank:02d}_{_safe(rec['id'])}.png").open("wb") as fh:
            im.save(fh, format="PNG")


def evaluate(
    predictor: Any,
    samples: Sequence[Mapping] | Iterable[Mapping],
    max_clicks: int = 20,
    output_dir: str | Path | None = None,
    *,
    stop_iou: float | None = None,
    limit: int | None = None,
    modes: Sequence[str] | None = None,
    metadata: Mapping | None = None,
    num_overlays: int = 6,
    progress: bool = True,
    concurrent_modes: bool = True,
    prefetch: bool = True,
    skip_bad: bool = False,
    identity: Mapping | None = None,
    init_masks: str | Path | None = None,
) -> dict:
    """Evaluate ``predictor`` on ``samples`` with the RITM NoC protocol.

    Args:
      predictor: ``set_image`` / ``click`` / ``reset`` object (module docstring).
      samples: sequence of ``{"image": uint8[H, W, 3], "gt": int8[H, W], "id": str|bytes}``
        (a FolderDataset, a Grain/TFDS source or a list; other iterables are materialised).
      max_clicks: clicks per sample (20 in every paper).
      output_dir: where the outputs go (module docstring); ``None`` writes nothing and does not
        resume.
      stop_iou: early stop once a sample reaches this IoU; ``None`` (default) never stops.
      limit: evaluate only the first ``limit`` samples.
      modes: several predictor modes sharing one image embedding per image: the predictor must
        have ``set_mode(mode)``; outputs go to ``output_dir/<mode>``.
      metadata: extra run metadata for ``metrics.json`` (dataset, checkpoint, label ...).
      num_overlays: how many worst samples get an overlay PNG.
      progress: show a tqdm progress bar with ETA.
      concurrent_modes: with several modes and a predictor that has ``fork(mode)``, run the
        modes' click loops at the same time, one thread and fork each, after one shared
        ``set_image``: the same clicks and IoUs, and one mode's host work (click simulator,
        IoU) overlaps the other's device step. Per-click times then include waiting for the
        other mode; ``False`` runs the modes one after the other (isolated per-click times).
      prefetch: with a predictor that has ``prepare_image``, embed the next image in a
        background thread while the current one is clicked (the same clicks and IoUs; both
        slow down, but the run's wall time drops while the clicks leave cores idle).
        ``False``: embed, then click, in turn.
      skip_bad: a sample that cannot be read or used (:class:`SampleError`, or any error of
        the predictor on it) is recorded (``failed.jsonl``; ``metrics.json`` ``failed``: id
        and reason) and the run goes on; ``False`` raises :class:`SampleError` (samples
        finished before it are written either way).
      identity: what makes this run this run (checkpoint and its hash, method, dataset,
        protocol options); stored in ``run.json`` with the mode, and a resume into a folder
        made by another run raises :class:`ResumeError`.
      init_masks: a folder of initial masks ``<id>.png`` (nonzero = object): every sample
        starts from its mask (the predictor's ``set_mask``; mask-correction protocol, module
        docstring); a missing one is a bad sample (``skip_bad``). Added to ``identity`` and
        ``metadata`` as ``init_masks``.

    Returns:
      The ``metrics.json`` dict, or ``{mode: metrics}`` when ``modes`` is given.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if not isinstance(samples, Sequence) and not hasattr(samples, "__getitem__"):
        samples = list(samples)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    n = len(samples) if limit is None else min(limit, len(samples))
    if n == 0:
        raise ValueError("the dataset holds no samples: nothing to evaluate")
    metadata = dict(metadata or {})
    metadata.setdefault("started", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    metadata.update(max_clicks=max_clicks, stop_iou=stop_iou)
    out_root = None if output_dir is None else as_path(output_dir)  # gs://... kept verbatim
    mode_list: list[str | None] = list(modes) if modes else [None]
    if modes and not hasattr(predictor, "set_mode"):
        raise TypeError("evaluate(modes=...) needs a predictor with set_mode(mode)")
    if init_masks is not None:
        if not hasattr(predictor, "set_mask"):
            raise TypeError("evaluate(init_masks=...) needs a predictor with set_mask(mask)")
        init_masks = str(as_path(init_masks, absolute=True))
        metadata["init_masks"] = init_masks
        if identity is not None:
            identity = {**identity, "init_masks": init_masks}
    runs = {}
    for m, (folder, ident) in run_folders(
        out_root, modes, identity, metadata.get("mode"), max_clicks, stop_iou
    ).items():
        runs[m] = _Run(folder, max_clicks, ident)
    known_ids = getattr(samples, "ids", None)
    ids: list[str] = []
    concurrent = bool(concurrent_modes and len(mode_list) > 1 and hasattr(predictor, "fork"))
    prefetch = bool(prefetch and hasattr(predictor, "prepare_image"))
    metadata.update(concurrent_modes=concurrent, prefetch=prefetch)
    pool = ThreadPoolExecutor(len(mode_list), "samref-eval") if concurrent else None
    embedder = ThreadPoolExecutor(1, "samref-embed") if prefetch else None
    bar = tqdm(
        total=n,
        desc=str(metadata.get("dataset", "eval")),
        disable=not progress,
        unit="img",
        dynamic_ncols=True,
    )

    def fetch(index: int, sid: str | None) -> tuple[str, Any]:
        """(id, sample), or (id, the error) when the sample cannot be read or is unusable."""
        try:
            sample = samples[index]
            if sid is None:
                sid = _as_str(sample["id"])
            image, gt = np.asarray(sample["image"]), np.asarray(sample["gt"])
            if image.ndim < 2 or gt.shape != image.shape[:2]:
                raise SampleError(
                    f"ground truth of shape {gt.shape} does not match the image {image.shape}"
                )
            if init_masks is not None:
                sample = {**sample, "init_mask": load_init_mask(init_masks, sid, gt.shape)}
            return sid, sample
        except Exception as e:  # decided by the loop: skip_bad, or stop after earlier samples
            return (sid if sid is not None else f"#{index}"), e

    def pending() -> Iterable[tuple[int, str, Any, list]]:
        """(index, id, sample or its error, modes to run) of the samples with work left."""
        for index in range(n):
            sample = None
            if known_ids is not None:
                sid = _as_str(known_ids[index])
            else:
                sid, sample = fetch(index, None)
            if sid in ids:
                raise ValueError(f"duplicate sample id {sid!r} at index {index}")
            ids.append(sid)
            todo = [m for m in mode_list if sid not in runs[m].records]
            if not todo:
                bar.update(1)
                continue
            if sample is None:
                sample = fetch(index, sid)[1]
            yield index, sid, sample, todo

    def bad_sample(index: int, sid: str, todo: list, error: BaseException) -> None:
        """Records (skip_bad) or raises the error of one sample, as one line."""
        if isinstance(error, SampleError | OSError | ValueError):
            text = str(error).strip().splitlines()
            reason = text[0] if text else type(error).__name__
        else:
            reason = f"{type(error).__name__}: {str(error).strip()[:200]}"
        if not skip_bad:
            if isinstance(error, ValueError | OSError):  # user data: one line, no traceback
                raise SampleError(f"sample {sid!r} (index {index}): {reason}") from error
            raise error
        for m in todo:
            runs[m].fail(index, sid, reason)
        bar.update(1)

    def embed(image: np.ndarray) -> tuple[Any, float]:
        t0 = time.perf_counter()
        prepared = predictor.prepare_image(image)
        return prepared, time.perf_counter() - t0

    try:
        work = iter(pending())
        item = next(work, None)
        ahead = None  # the background embedding of `item`'s image
        first = True
        while item is not None:
            index, sid, sample, todo = item
            if isinstance(sample, BaseException):
                item, ahead = next(work, None), None
                bad_sample(index, sid, todo, sample)
                continue
            image, gt = np.asarray(sample["image"]), np.asarray(sample["gt"])
            init = sample.get("init_mask")
            t0 = time.perf_counter()
            try:
                if ahead is not None:
                    prepared, embed_seconds = ahead.result()
                    predictor.set_image(prepared)
                else:
                    predictor.set_image(image)
                    embed_seconds = time.perf_counter() - t0
            except Exception as e:
                item, ahead = next(work, None), None
                bad_sample(index, sid, todo, e)
                continue
            wait_seconds = time.perf_counter() - t0
            item = next(work, None)
            ahead = None
            if embedder is not None and item is not None and isinstance(item[2], Mapping):
                # The next image's embedding runs while this image is clicked.
                ahead = embedder.submit(embed, np.asarray(item[2]["image"]))
            together = pool is not None and len(todo) > 1
            try:
                if together:
                    # Every mode's click loop in its own fork and thread, on one embedding.
                    futures = [
                        pool.submit(
                            run_sample,
                            predictor.fork(m),
                            image,
                            gt,
                            max_clicks,
                            stop_iou,
                            False,
                            init,
                        )
                        for m in todo
                    ]
                    done = [f.result() for f in futures]
                else:
                    done = []
                    for m in todo:
                        if m is not None:
                            predictor.set_mode(m)
                        done.append(
                            run_sample(predictor, image, gt, max_clicks, stop_iou, False, init)
                        )
            except Exception as e:
                bad_sample(index, sid, todo, e)
                continue
            for j, (m, (rec, mask)) in enumerate(zip(todo, done, strict=True)):
                rec["set_image_seconds"] = embed_seconds
                if prefetch:
                    rec["embedding_wait_s"] = wait_seconds
                if j > 0:
                    rec["shared_embedding"] = True
                if together:
                    rec["concurrent_modes"] = True
                rec = {"id": sid, "index": index, "max_clicks": max_clicks, "warmup": first, **rec}
                runs[m].add(rec, mask)
            first = False
            bar.update(1)
            curves = [
                runs[mode_list[0]].records[i]["ious"]
                for i in ids
                if i in runs[mode_list[0]].records
            ]
            bar.set_postfix(
                NoC90=f"{M.noc(curves, 0.9, max_clicks):.2f}",
                mIoU=f"{M.miou_curve(curves, max_clicks)[-1]:.3f}",
            )
    finally:
        bar.close()
        if embedder is not None:
            embedder.shutdown(wait=False, cancel_futures=True)
        if pool is not None:
            pool.shutdown()
        for r in runs.values():
            r.close()
    elapsed = time.perf_counter() - start
    results = {}
    for m, run in runs.items():
        meta = dict(metadata)
        if m is not None:
            meta["mode"] = m
        results[m] = _finish(run, ids, samples, max_clicks, meta, num_overlays, elapsed)
    return results[None] if modes is None else results
