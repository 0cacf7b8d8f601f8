"""The training loop: data, sharded step, checkpoints/resume, logging, eval, export, plots.

``train(config, workdir)`` runs until ``train.num_steps`` or the ``train.max_minutes``
wall-clock budget (counted across resumes, including start-up and compile time) and writes::

    WORKDIR/config.json          the full config
    WORKDIR/checkpoints/<step>/  orbax: state (params, opt state, step, rng) + data (JSON)
    WORKDIR/metrics.jsonl        one line per step: losses and IoU per round, throughput
    WORKDIR/eval.jsonl           periodic held-out NoC@85/90/95 and 5-mIoU
    WORKDIR/curves.png           loss and NoC curves
    WORKDIR/export/              the model (``save_samref``), for SamRefPredictor.from_checkpoint

Each step is dispatched, then the next batch is read and sent to the devices while it runs,
then its metrics are fetched (docs/design.md, 'Training step').
A second call with the same ``workdir`` resumes from the newest checkpoint (same data order).
A preemption notice (SIGTERM to any process) ends a call early: every process checkpoints one
agreed step and returns without evaluating or exporting (``preemption.PreemptionWatch``).
It first compares the requested config with ``WORKDIR/config.json`` and refuses a difference in
anything that changes the model or the data (``TrainConfigError`` listing the keys) unless
``allow_config_change``; only the keys in ``RESUME_SAFE`` (run length, logging and checkpoint
cadence, file locations, eval) may change. A bad ``mode`` or ``train.remat_policy`` is refused
before anything is created.

Several processes (``jax.distributed``): each reads its own part of every global batch, all of
them save and restore the checkpoints together (orbax), and only process 0 writes the logs,
evaluates, plots and exports.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from samref_jax.paths import as_path
from samref_jax.training import step as S
from samref_jax.training.checkpointing import TrainCheckpointer
from samref_jax.training.pipeline import heldout_samples, make_train_dataset, prepare_source

MODES = ("sam", "global", "full")
# Config keys (dotted; a trailing "." is a prefix) a resume may change: they do not change the
# model or the data it sees.
RESUME_SAFE = (
    "train.num_steps",
    "train.max_minutes",
    "train.log_every",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "data.num_workers",
    "data.data_dir",
    "data.manual_dir",
    "data.cache_dir",
    "data.coco.annotations",
    "data.coco.images",
    "data.coco.num_shards",
    "eval.",
)

# Keys added after runs may have started: absent from a stored config.json and set to the value
# that reproduces what such a run did, they are no change.
ADDED_KEYS = {
    "data.use_cached_embeddings": False,
    "data.cached_views": None,  # any value: unused without cached embeddings
    "data.cache_dtype": None,
    "data.cache_dir": None,
    "data.format": "folder",
    **dict.fromkeys(  # any value: unused with the folder format
        "data.coco." + k
        for k in "annotations images dedup_iou num_shards min_area merge_prob max_merged".split()
    ),
    "data.copy_paste_prob": 0.0,
    "data.copy_paste_scale": None,  # any value: unused without copy-paste
    "data.copy_paste_distractor_prob": None,
    "data.copy_paste_max_cover": None,
    "train.init_subtrees": [],
    "train.remat_policy": "nothing_saveable",
    "model.refiners.patch_diff.image_scale": 1,
}


class TrainConfigError(ValueError):
    """The config cannot be used (a bad value, or it differs from the run being resumed)."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Values that would fail later, after tracing: refused up front."""
    if str(config.get("mode")) not in MODES:
        raise TrainConfigError(
            f"config.mode must be one of {', '.join(MODES)}, got {config.get('mode')!r}"
        )
    try:
        S.remat_policy(config)
    except ValueError as e:
        raise TrainConfigError(str(e)) from None
    slots = int(config.model.max_clicks)  # clicks the model holds per object
    if int(config.train.rounds) > slots:
        raise TrainConfigError(
            f"train.rounds ({int(config.train.rounds)}) exceeds model.max_clicks ({slots}): "
            "each round adds a click"
        )
    ev = config.eval
    if int(ev.every_steps) > 0 and int(config.data.heldout_every) > 0 and ev.max_clicks > slots:
        raise TrainConfigError(
            f"eval.max_clicks ({int(ev.max_clicks)}) exceeds model.max_clicks ({slots}): the "
            "periodic evaluation would fail at its first evaluation"
        )


def resume_config_changes(
    workdir: Path, config: ml_collections.ConfigDict
) -> tuple[list[str], list[str]]:
    """``(refused, allowed)``: the dotted keys where ``config`` differs from the
    ``WORKDIR/config.json`` of the run being resumed (both empty for a new run)."""
    path = workdir / "config.json"
    if not path.is_file():
        return [], []
    try:
        old = _flatten(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise TrainConfigError(
            f"{path} is damaged ({e}); cannot tell whether this resume uses the same config "
            "(pass --allow_config_change to overwrite it)"
        ) from None
    new = _flatten(json.loads(config.to_json_best_effort()))

    def same(k: str) -> bool:
        if k not in old and k in ADDED_KEYS:
            want = ADDED_KEYS[k]
            return want is None or new.get(k) == want
        return old.get(k, "<absent>") == new.get(k)

    changed = sorted(k for k in set(old) | set(new) if not same(k))
    safe = [
        k
        for k in changed
        if any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_SAFE)
    ]
    return [k for k in changed if k not in safe], safe


def _jsonable(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = float(a) if a.ndim == 0 else [float(x) for x in a.ravel()]
    return out


def _export(workdir: Path, params: Any, config: ml_collections.ConfigDict, meta: dict) -> Path:
    from samref_jax.samref.io import save_samref

    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
    return save_samref(workdir / "export", host, config.model, meta)


class _Evaluator:
    """Periodic held-out NoC evaluation with one predictor (compiled once, params swapped)."""

    def __init__(self, config: ml_collections.ConfigDict, samples: list[dict]) -> None:
        self.config, self.samples, self.predictor = config, samples, None

    def __call__(self, params: Any) -> dict:
        from samref_jax.evaluation import evaluate
        from samref_jax.samref.predictor import SamRefPredictor

        host = jax.tree_util.tree_map(lambda x: jnp.asarray(jax.device_get(x)), params)
        if self.predictor is None:
            self.predictor = SamRefPredictor(host, self.config.model, mode=self.config.mode)
        self.predictor.params = host
        m = evaluate(
            self.predictor,
            self.samples,
            max_clicks=int(self.config.eval.max_clicks),
            progress=False,
        )
        return {
            k: m[k]
            for k in m
            if k.startswith(("NoC", "NoF", "5-mIoU", "mIoU@")) and not isinstance(m[k], list)
        } | {"num_samples": len(self.samples)}


def plot_curves(workdir: Path) -> Path | None:
    """``curves.png``: training loss (and final-round IoU) and held-out NoC vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_jsonl(workdir / "metrics.jsonl")
    evals = _read_jsonl(workdir / "eval.jsonl")
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    k = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    axes[0].plot(steps, loss, alpha=0.3, label="loss")
    axes[0].plot(steps[k - 1 :], smooth, label=f"loss (mean of {k})")
    ax2 = axes[0].twinx()
    iou_last = np.array([r["iou"][-1] for r in rows])
    ax2.plot(
        steps[k - 1 :],
        np.convolve(iou_last, np.ones(k) / k, mode="valid"),
        "g",
        label="train IoU, last round",
    )
    ax2.set_ylabel("IoU")
    axes[0].set_xlabel("step")
    axes[0].set_title("training")
    axes[0].legend(loc="upper right")
    if evals:
        es = [e["step"] for e in evals]
        for key in ("NoC@85", "NoC@90"):
            axes[1].plot(es, [e.get(key) for e in evals], "o-", label=key)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("clicks")
        axes[1].set_title("held-out NoC")
        axes[1].legend()
    fig.tight_layout()
    out = workdir / "curves.png"
    with out.open("wb") as fh:  # an epath workdir may be gs://...
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line after a kill
            pass
    return out


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    export: bool = True,
    command: str | None = None,
    stop_at_step: int | None = None,
    kill_after_step: int | None = None,
    preempt_after_step: int | None = None,
    fail_after_step: int | None = None,
    allow_config_change: bool = False,
) -> dict:
    """Trains (or resumes) into ``workdir``; returns a summary dict (steps, steps/s, ...).

    ``stop_at_step`` ends this call early (after checkpointing), as a kill would; the next
    call resumes (tests use it to simulate an interruption). ``kill_after_step`` SIGKILLs the
    process right after the checkpoint of that step is written (tests: a crash).
    ``preempt_after_step`` sends the last process SIGTERM after that step (tests: a
    scheduler's preemption notice reaching one host); on such a notice every process stops at
    one agreed step, checkpoints it and returns with ``stop_reason`` "preempted", without the
    final evaluation and export (``preemption.PreemptionWatch``). ``fail_after_step`` raises
    an error in the last process alone after that step (tests: a failure on one host).
    ``allow_config_change`` resumes even when the config differs in keys that change the model
    or the data (module docstring).
    """
    from samref_jax.host import tune_malloc
    from samref_jax.training.distributed import barrier
    from samref_jax.training.preemption import PreemptionWatch, notify_self

    check_config(config)  # before tracing anything and before creating the workdir
    tune_malloc()  # XLA:CPU's scratch blocks from the heap, not fresh pages (host.py)
    t_start = time.time()
    workdir = as_path(workdir)  # epath: gs://... kept verbatim (samref_jax.paths)
    main = jax.process_index() == 0  # logs, eval, plots and export come from process 0
    refused, _ = resume_config_changes(workdir, config)  # before config.json is rewritten
    if refused and not allow_config_change:
        old = _flatten(json.loads((workdir / "config.json").read_text()))
        new = _flatten(json.loads(config.to_json_best_effort()))
        shown = ", ".join(
            f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})" for k in refused[:6]
        )
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise TrainConfigError(
            f"{workdir} was trained with another config: {shown}{more} differ (they change the "
            "model or the data); resume with the same config, use a new --workdir, or pass "
            "--allow_config_change"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    # Every process has read the stored config.json before process 0 replaces it (a process
    # reading it while it is rewritten would see a damaged file and stop alone).
    barrier("samref_config_compared")
    if main:  # written whole, then renamed: a run killed meanwhile leaves the old one
        tmp = workdir / "config.json.tmp"
        tmp.write_text(config.to_json_best_effort(indent=2) + "\n")
        tmp.replace(workdir / "config.json")
    tc = config.train

    data_dir = as_path(config.data.data_dir) if config.data.data_dir else workdir / "tfds"
    if main:  # prepared once, by process 0, before the others open it
        prepare_source(config, data_dir)
    barrier("samref_prepare_data")
    source = prepare_source(config, data_dir)
    it = iter(make_train_dataset(config, source))

    mesh = S.make_mesh()
    params = S.init_params(config, jax.random.key(int(config.seed), impl="rbg"))
    state = S.put_replicated(S.create_state(config, params, int(config.seed)), mesh)
    step_fn = S.make_train_step(config, mesh, params)
    del params

    ckpt = TrainCheckpointer(workdir / "checkpoints", int(tc.keep_checkpoints))
    minutes_before = 0.0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, data_state = restored
        it.set_state(data_state["iterator"])
        minutes_before = float(data_state.get("minutes_used", 0.0))
        if main:
            _truncate_jsonl(workdir / "metrics.jsonl", int(state.step))
            _truncate_jsonl(workdir / "eval.jsonl", int(state.step))
            print(
                f"resumed from step {int(state.step)} ({minutes_before:.1f} min used)",
                file=sys.stderr,
            )

    if jax.process_count() > 1 and int(state.step) < int(tc.num_steps):
        # Compile before the first cross-process collective and wait for every process:
        # processes finish compiling at different times (a cache hit on one of them), and a
        # step that waits in gloo's all-reduce for a compiling peer would time out.
        data_state = it.get_state()
        step_fn = step_fn.lower(state, S.shard_batch(next(it), mesh)).compile()
        it.set_state(data_state)
        barrier("samref_step_compiled")

    evaluator = None
    eval_on = int(config.eval.every_steps) > 0 and int(config.data.heldout_every) > 0
    if main and eval_on:
        evaluator = _Evaluator(config, heldout_samples(config, source, config.eval.num_samples))

    eval_seconds = [0.0]

    def minutes_used() -> float:
        """Wall-clock minutes of this run (all resumes), periodic evaluation excluded."""
        return minutes_before + (time.time() - t_start - eval_seconds[0]) / 60.0

    def run_eval() -> None:
        t0 = time.time()
        ev = {"step": step, **evaluator(state.params), "minutes": minutes_used()}
        elog.write(json.dumps(ev) + "\n")
        elog.flush()
        eval_seconds[0] += time.time() - t0
        bar.write(
            f"step {step}: held-out NoC@85 {ev.get('NoC@85'):.2f} "
            f"NoC@90 {ev.get('NoC@90'):.2f} 5-mIoU {ev.get('5-mIoU'):.3f}"
        )

    # The iterator's state after the batches of the steps run so far: what a checkpoint
    # stores. The iterator itself may be one batch further (the batch read ahead below).
    consumed = [it.get_state()]

    def save() -> None:
        ckpt.save(int(state.step), state, {"iterator": consumed[0], "minutes_used": minutes_used()})

    def read_ahead() -> tuple[dict, float, dict]:
        """The next batch, already sent to its devices; the host seconds it took; the
        iterator's state after it."""
        t0 = time.time()
        batch = S.shard_batch(next(it), mesh)
        return batch, time.time() - t0, it.get_state()

    from tqdm.auto import tqdm

    num_steps = int(tc.num_steps)
    start_step = int(state.step)
    global_batch = int(config.data.per_device_batch_size) * jax.device_count()
    bar = tqdm(
        total=num_steps,
        initial=start_step,
        disable=not (progress and main),
        dynamic_ncols=True,
        desc=f"train {config.mode}",
    )
    log_path = (lambda name: workdir / name) if main else (lambda name: os.devnull)
    mlog = as_path(log_path("metrics.jsonl")).open("a", encoding="utf-8")  # noqa: SIM115
    elog = as_path(log_path("eval.jsonl")).open("a", encoding="utf-8")  # noqa: SIM115
    step = start_step
    stop_reason = "num_steps"
    timing = {"steps_s": 0.0, "timed": 0, "last": time.time()}
    last = jax.process_index() == jax.process_count() - 1
    check_every = 1 if jax.process_count() == 1 else max(int(tc.log_every), 1)
    ahead = None  # the next batch, read while a step runs
    pending = None  # (step, metrics on the devices, data seconds): the step not logged yet

    def log_row(n: int, device_metrics: dict, t_data: float) -> None:
        """Waits for step ``n``'s metrics and writes its row. ``step_s``: the time since the
        previous step's metrics arrived (checkpoint and evaluation time excluded)."""
        metrics = _jsonable(jax.device_get(device_metrics))
        now = time.time()
        dt, timing["last"] = now - timing["last"], now
        if n > start_step + 1:  # exclude the compiling step from throughput
            timing["steps_s"] += dt
            timing["timed"] += 1
        sps = timing["timed"] / timing["steps_s"] if timing["steps_s"] else 0.0
        row = {
            "step": n,
            **metrics,
            "step_s": dt,
            "data_s": t_data,
            "steps_per_s": sps,
            "images_per_s": sps * global_batch,
            "minutes": minutes_used(),
        }
        mlog.write(json.dumps(row) + "\n")
        mlog.flush()
        bar.update(1)
        if n % max(int(tc.log_every), 1) == 0:
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}", iou=f"{metrics['iou'][-1]:.3f}", sps=f"{sps:.2f}"
            )

    def log_pending() -> None:
        nonlocal pending
        if pending is not None:
            log_row(*pending)
            pending = None

    try:
        with PreemptionWatch() as watch:
            while step < num_steps:
                if stop_at_step is not None and step >= stop_at_step:
                    stop_reason = "stop_at_step"
                    break
                # With several processes the budget is agreed on (a collective that waits for
                # the step running) every log_every steps only.
                if (
                    tc.max_minutes
                    and step % check_every == 0
                    and _all_agree(minutes_used() >= float(tc.max_minutes))
                ):
                    stop_reason = "max_minutes"
                    break
                batch, t_data, consumed[0] = ahead if ahead is not None else read_ahead()
                state, metrics = step_fn(state, batch)  # dispatched; runs on the devices
                step += 1
                # While it runs, the host reads the next batch and sends it to the devices (a
                # batch read for a step that then does not run is never checkpointed), then
                # logs the step before, so that the devices always have the next step queued.
                ahead = read_ahead() if step < num_steps else None
                log_pending()
                pending = (step, metrics, t_data)
                evaluate = eval_on and step % int(config.eval.every_steps) == 0
                checkpoint = step % max(int(tc.checkpoint_every_steps), 1) == 0
                if evaluate or checkpoint:  # both read this step's state before it is donated
                    log_pending()
                    if evaluate:
                        if evaluator is not None:
                            run_eval()
                        barrier("samref_eval")  # the others wait here, not in a collective
                    if checkpoint:
                        save()
                        if kill_after_step is not None and step == int(kill_after_step):
                            ckpt.wait()  # a crash after the checkpoint is written
                            mlog.flush()
                            os.kill(os.getpid(), signal.SIGKILL)
                    timing["last"] = time.time()
                if preempt_after_step is not None and step == int(preempt_after_step) and last:
                    notify_self()
                if fail_after_step is not None and step == int(fail_after_step) and last:
                    raise RuntimeError(f"fail_after_step: an error after step {step}")
                if watch.reached(step):  # every process: the same step
                    stop_reason = "preempted"
                    break
            log_pending()
    finally:
        bar.close()
    if ckpt.latest_step() != step:
        save()
    preempted = stop_reason == "preempted"
    if preempted and main:
        print(
            f"preemption notice: stopped after step {step}, checkpoint written; the same "
            "command resumes from it",
            file=sys.stderr,
            flush=True,
        )
    if (
        evaluator is not None
        and not preempted
        and (
            not _read_jsonl(workdir / "eval.jsonl")
            or _read_jsonl(workdir / "eval.jsonl")[-1]["step"] != step
        )
    ):
        run_eval()
    barrier("samref_final_eval")
    mlog.close()
    elog.close()
    ckpt.close()
    summary = {
        "steps": step,
        "stop_reason": stop_reason,
        "minutes_used": minutes_used(),
        "eval_minutes_this_call": eval_seconds[0] / 60.0,
        "steps_per_s": timing["timed"] / timing["steps_s"] if timing["steps_s"] else None,
        "images_per_s": (
            timing["timed"] * global_batch / timing["steps_s"] if timing["steps_s"] else None
        ),
        "global_batch": global_batch,
        "devices": jax.device_count(),
        "mode": str(config.mode),
        "seed": int(config.seed),
    }
    if export and not preempted:  # every process: orbax's save is collective
        meta = {"training": {**summary, "command": command, "config": config.to_dict()}}
        meta = json.loads(json.dumps(meta, default=str))
        summary["export"] = str(_export(workdir, state.params, config, meta))
        if main:
            plot_curves(workdir)
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _all_agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (wall-clock decisions must not diverge)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag))))


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drops log lines past ``step`` (written after the checkpoint we resume from)."""
    rows = [r for r in _read_jsonl(path) if r.get("step", 0) <= step]
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
