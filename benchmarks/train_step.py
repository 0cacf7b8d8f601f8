"""Training-step cost, part by part, with the image encoder in the step vs cached embeddings.

    python benchmarks/train_step.py                          # the vit_b recipe's shapes
    python benchmarks/train_step.py --sam tiny --frame 128   # small, for a quick check
    python benchmarks/train_step.py --parts cached --batch 16   # the cached step alone
    python benchmarks/train_step.py --parts memory --batch 1 4 16  # compile only: memory

Shapes are the recipe's (``configs/samref_vit_b.py``: 1024 frame, T = 6 unrolled clicks, frozen
image encoder; random weights) at ``--batch`` images per step (default 1) on the default device.
Each part is its own ``jax.jit`` on the same inputs (synthetic images, their embeddings from
the encoder part):

* encoder: ``embed_image`` forward (frozen: no backward);
* click rounds: the step's own ``loss_and_grads`` of the T-round unroll given the embedding
  (SAM prompt encoder + mask decoder, both refiners, losses, the jittable clicker), forward +
  backward;
* clicker: T rounds of ``next_click_jax`` alone (also inside the click rounds above), on a
  prediction that shifts by a pixel per round;
* optimiser: the masked AdamW update and ``apply_updates``, moments and parameters donated as
  in the step;
* the whole training step (``make_train_step``), once with the encoder in the step and once
  with the batch carrying ``embedding`` (what ``data.use_cached_embeddings`` feeds it).

FLOPs are model FLOPs: XLA's ``cost_analysis()`` of each function lowered for the CPU (on every
backend; GPU analyses miss the matmuls handed to cuBLAS, see ``accelerator.py``), with the T
rounds unrolled (the analysis counts a loop body once) and without ``train.remat``'s
recomputation; the clicker's own distance-transform loops still count once (negligible). MFU
(FLOPs / time / the device's dense bf16 peak, ``PEAK_FLOPS``) is reported only on an
accelerator. Targets, reported and not asserted: cached step <= 0.15x
the in-step-encoder step, clicker <= 10% of the cached step.

Memory is XLA's buffer assignment of each compiled whole step on the backend that compiles it
(``memory_analysis()``): its temporary buffers plus its arguments (state and batch; the new
state reuses the donated state's buffers in training).
``--parts memory`` only compiles the two whole steps from abstract shapes at each ``--batch``
(nothing is allocated, so batches larger than the machine's memory can be sized);
``--parts cached`` times the cached-embedding step alone (a batch sweep on an accelerator).
``--profile DIR`` then traces three cached steps (``jax.profiler``, a Perfetto trace in DIR)
and prints each device timeline's busy time per step and its most expensive operations: how
much of the step the device idles, and on what it works; the step's optimised HLO goes to
``DIR/cached_step.hlo.txt.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import device_median, fmt_bytes, fmt_flops, fmt_time, table  # noqa: E402

TARGET_RATIO = 0.15
TARGET_CLICKER = 0.10


def _remat_desc(cfg) -> str:
    """'False', or 'True' and the policy when it saves anything."""
    policy = cfg.train.get("remat_policy", "nothing_saveable")
    if not cfg.train.remat:
        return "False"
    return "True" if policy == "nothing_saveable" else f"True ({policy})"


def _config(
    sam: str,
    frame: int | None,
    rounds: int | None,
    batch: int,
    dtype: str | None,
    remat: bool | None = None,
    mode: str | None = None,
    global_size: int | None = None,
    remat_policy: str | None = None,
):
    from configs.samref_vit_b import get_config

    cfg = get_config(sam)
    if mode:
        cfg.mode = mode
    if global_size is not None:  # 0: the whole frame
        cfg.model.refiners.global_diff.input_size = int(global_size) or None
    if remat is not None:
        cfg.train.remat = bool(remat)
    if remat_policy:
        cfg.train.remat_policy = remat_policy
    cfg.train.init_checkpoint = ""  # random weights
    cfg.data.per_device_batch_size = batch
    if frame:
        cfg.model.sam_overrides = dict(cfg.model.sam_overrides or {}, img_size=int(frame))
    if rounds:
        cfg.train.rounds = int(rounds)
    if dtype:
        cfg.train.dtype = dtype
    return cfg


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def step_memory(compiled) -> dict[str, float]:
    """Bytes of a compiled step from XLA's buffer assignment: ``temp`` (temporaries) and
    ``total`` (temporaries + arguments: state and batch; in training the new state reuses the
    donated state's buffers, so outputs add only the metrics)."""
    m = compiled.memory_analysis()
    return {"temp": m.temp_size_in_bytes, "total": m.temp_size_in_bytes + m.argument_size_in_bytes}


def run_memory(a: argparse.Namespace) -> str:
    """``--parts memory``: compile (no run) both whole steps at each ``--batch``; a table."""
    import jax
    import jax.numpy as jnp

    from samref_jax.samref.config import sam_config_from
    from samref_jax.samref.model import detail_scale
    from samref_jax.training import step as S
    from samref_jax.training.testing import synthetic_batch

    rows, desc = [], ""
    for b in a.batch:
        cfg = _config(
            a.sam, a.frame, a.rounds, b, a.dtype, a.remat, a.mode, a.global_size, a.remat_policy
        )
        sam_cfg = sam_config_from(cfg.model)
        f, n = sam_cfg.img_size, b * jax.device_count()
        mesh = S.make_mesh()
        params = jax.eval_shape(lambda k, c=cfg: S.init_params(c, k), jax.random.key(0))
        state = jax.eval_shape(lambda p, c=cfg: S.create_state(c, p, 0), params)
        one = synthetic_batch(1, f, seed=0, detail_scale=detail_scale(cfg.model))
        raw = {k: jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype) for k, v in one.items()}
        side = f // 16  # SAM's embedding grid
        emb = jax.ShapeDtypeStruct((n, side, side, sam_cfg.prompt_embed_dim), jnp.float32)
        cells = [str(b)]
        for name, batch in (("encoder in the step", raw), ("cached", dict(raw, embedding=emb))):
            step = S.make_train_step(cfg, mesh, params)
            mem = step_memory(step.lower(state, batch).compile())
            cells += [fmt_bytes(mem["temp"]), fmt_bytes(mem["total"])]
            print(f"compiled: batch {b}, {name}: {fmt_bytes(mem['total'])}", flush=True)
        cells.append(fmt_bytes(mem["temp"] / b))
        rows.append(cells)
        desc = (
            f"SAM {sam_cfg.name}, frame {f}, T = {cfg.train.rounds}, {cfg.train.dtype} compute, "
            f"mode {cfg.mode}, remat {_remat_desc(cfg)}, on {jax.device_count()} "
            f"{jax.default_backend()} device(s) ({jax.devices()[0].device_kind}); memory per device"
        )
    head = ["images per device", "encoder in the step: temporaries", "total"]
    head += ["cached embedding: temporaries", "total", "cached temporaries per image"]
    return desc + "\n\n" + table(head, rows)


def run(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from etils import epath

    from benchmarks.accelerator import (
        PEAK_FLOPS,
        _flops,
        _on_cpu,
        flop_count_config,
        peak_key,
        train_step_flops,
    )
    from samref_jax.interaction.clicker import next_click_jax
    from samref_jax.samref.config import sam_config_from
    from samref_jax.samref.model import SamRef, detail_scale
    from samref_jax.training import step as S
    from samref_jax.training.testing import synthetic_batch

    cfg = _config(
        a.sam, a.frame, a.rounds, a.batch, a.dtype, a.remat, a.mode, a.global_size, a.remat_policy
    )
    sam_cfg = sam_config_from(cfg.model)
    f, T, B = sam_cfg.img_size, int(cfg.train.rounds), int(a.batch) * jax.device_count()
    on_cpu = jax.default_backend() == "cpu"
    dev = jax.devices()[0]
    key = None if on_cpu else peak_key(dev.device_kind)
    peak = PEAK_FLOPS.get(key) if key else None

    mesh = S.make_mesh()
    model = S.model_of(cfg)
    params = jax.jit(lambda k: S.init_params(cfg, k))(jax.random.key(0, impl="rbg"))
    params = S.put_replicated(params, mesh)
    tx = S.make_optimizer(cfg, params)
    state = S.put_replicated(S.create_state(cfg, params, 0), mesh)
    k = detail_scale(cfg.model)  # the recipe's PatchDiff image scale
    raw = S.shard_batch(synthetic_batch(B, f, seed=0, detail_scale=k), mesh)

    count_cfg = flop_count_config(cfg)  # rounds unrolled, no remat: model FLOPs

    def flops(fn, *args) -> float:
        return _flops(jax.jit(fn).lower(*_on_cpu(args))) if a.flops else math.nan

    rows: dict[str, dict] = {}
    compile_s: dict[str, float] = {}

    def measure(name: str, fn, *args, count_fn=None) -> object:
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s[name] = time.perf_counter() - t0
        t, out = device_median(lambda: compiled(*args), a.runs)
        rows[name] = {"s": t, "flops": flops(count_fn or fn, *args)}
        print(f"measured {name}: {fmt_time(t)} (compile {compile_s[name]:.1f} s)", flush=True)
        return out

    def whole_step(name: str, batch: dict) -> None:
        """Time, FLOPs and memory of one whole training step (printed as soon as measured); the
        cached-embedding step is then traced with ``--profile``."""
        step = S.make_train_step(cfg, mesh, params, donate=False)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s[name] = time.perf_counter() - t0
        call = lambda: compiled(state, batch)  # noqa: E731
        t, faults = timed_with_faults(call, a.runs)
        print(f"measured {name}: {fmt_time(t)} (compile {compile_s[name]:.1f} s)", flush=True)
        flop = train_step_flops(cfg, state, batch) if a.flops else math.nan
        rows[name] = {"s": t, "flops": flop, "memory": step_memory(compiled)["total"], **faults}
        if a.profile and name == "step, cached embedding":
            hlo = epath.Path(a.profile) / "cached_step.hlo.txt.gz"  # the optimised program
            hlo.parent.mkdir(parents=True, exist_ok=True)
            hlo.write_bytes(gzip.compress(compiled.as_text().encode()))
            print(f"\n{profile_step(call, t, a.profile)}\n", flush=True)
            if on_cpu:
                print(memory_pass(global_diff_grid(cfg, B), a.runs) + "\n", flush=True)

    def result() -> dict:
        """The result dict of the parts measured, in the table's order."""
        order = ["encoder", "click rounds", "clicker", "optimiser"]
        order += ["step, encoder in the step", "step, cached embedding"]
        table_rows = {k: rows[k] for k in order if k in rows}
        for r in table_rows.values():
            r["mfu"] = r["flops"] / r["s"] / peak if peak else None
        fast = rows["step, cached embedding"]["s"]
        steps = [k for k in table_rows if k.startswith("step, ")]
        per_s = {k.split(", ", 1)[1]: B / rows[k]["s"] for k in steps}
        res = {
            "rows": table_rows,
            "compile_s": {k: compile_s[k] for k in table_rows},
            "images_per_s": per_s,
            "clicks_per_s": {k: v * T for k, v in per_s.items()},
            "desc": (
                f"SAM {sam_cfg.name}, frame {f}, T = {T}, batch {B} on {jax.device_count()} "
                f"{jax.default_backend()} device(s) ({dev.device_kind}), {cfg.train.dtype} "
                f"compute, mode {cfg.mode}, remat {_remat_desc(cfg)}, GlobalDiff working "
                f"size {cfg.model.refiners.global_diff.input_size or f}, "
                f"trainable {','.join(S.effective_trainable(cfg))}"
            ),
            "peak": key,
            "on_cpu": on_cpu,
        }
        if "step, encoder in the step" in rows:
            res["ratio"] = fast / rows["step, encoder in the step"]["s"]
        if "clicker" in rows:
            res["clicker_share"] = rows["clicker"]["s"] / fast
        return res

    # 1. encoder (forward only; the recipe freezes it)
    def encoder(p, image, valid_hw):
        x = S.preprocess_frame(image, valid_hw, sam_cfg)
        return model.apply({"params": p}, x, method=SamRef.embed_image)

    if a.parts == "cached":  # the embedding is an input of the cached step: no timing
        emb = jax.jit(encoder)(params, raw["image"], raw["valid_hw"])
        whole_step("step, cached embedding", dict(raw, embedding=emb))
        return result()

    emb = measure("encoder", encoder, params, raw["image"], raw["valid_hw"])
    cached = dict(raw, embedding=emb)
    # 2. the cached-embedding step first: on a device lent for minutes, the number that counts
    whole_step("step, cached embedding", cached)

    # 3. click rounds, forward + backward, given the embedding (the clicker included)
    # The step's own gradient function (frozen leaves under stop_gradient).
    _, _, grads = measure(
        "click rounds",
        S.loss_and_grads(cfg),
        params,
        cached,
        count_fn=S.loss_and_grads(count_cfg),
    )

    # 4. the clicker alone: T rounds of next_click_jax on a prediction with errors
    gt = raw["gt"] == 1
    valid = (raw["gt"] >= 0) & S.valid_mask(raw["valid_hw"], (f, f))
    pred = jnp.roll(gt, (f // 16, f // 12), axis=(1, 2))
    fy, fx = raw["first_click"][:, 0], raw["first_click"][:, 1]
    clicked = jnp.zeros((B, f, f), bool).at[jnp.arange(B), fy, fx].set(True)

    def clicker_of(unroll: bool):
        def clicker(gt, pred, clicked, valid):
            def body(c, t):
                # The prediction moves by a pixel per round, as it changes in training: with a
                # fixed one XLA would hoist the distance transforms out of the loop.
                p = jnp.roll(pred, t, axis=2)
                cy, cx, pos = jax.vmap(next_click_jax)(gt, p, c, valid)
                return c.at[jnp.arange(gt.shape[0]), cy, cx].set(True), (cy, cx, pos)

            return jax.lax.scan(body, clicked, jnp.arange(T), unroll=unroll)[1]

        return clicker

    args = (gt, pred, clicked, valid)
    measure("clicker", clicker_of(False), *args, count_fn=clicker_of(True))

    # 5. optimiser: as in the step, the moments and parameters are donated (updated in place,
    # the frozen parameters passed through without a copy), so each call feeds the next one.
    def optimiser(g, opt_state, p):
        updates, opt_state = tx.update(g, opt_state, p)
        return opt_state, optax.apply_updates(p, updates)

    carry = [jax.tree_util.tree_map(jnp.copy, (state.opt_state, params))]  # the step's stay
    opt_flops = flops(optimiser, grads, *carry[0])
    t0 = time.perf_counter()
    opt = jax.jit(optimiser, donate_argnums=(1, 2)).lower(grads, *carry[0]).compile()
    compile_s["optimiser"] = time.perf_counter() - t0

    def optimiser_call():
        carry[0] = opt(grads, *carry[0])
        return carry[0]

    t, _ = device_median(optimiser_call, a.runs)
    rows["optimiser"] = {"s": t, "flops": opt_flops}
    print(f"measured optimiser: {fmt_time(t)} (compile {compile_s['optimiser']:.1f} s)", flush=True)

    # 6. the whole step with the encoder in it (same examples)
    whole_step("step, encoder in the step", raw)
    return result()


def timed_with_faults(call, runs: int) -> tuple[float, dict[str, float]]:
    """``device_median(call, runs)``'s time, and the minor page faults and kernel (system) CPU
    seconds of this process per call over the calls it makes (after one more call, in which
    the heap may grow): what the host allocator costs (docs/design.md, 'Host malloc')."""
    import jax

    jax.block_until_ready(call())
    before = resource.getrusage(resource.RUSAGE_SELF)
    t, _ = device_median(call, runs)
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = 1 + max(runs, 0)  # device_median's warm-up call and its timed ones
    return t, {
        "faults": (after.ru_minflt - before.ru_minflt) / n,
        "sys_s": (after.ru_stime - before.ru_stime) / n,
    }


def _busy(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def trace_summary(trace_dir: str, steps: int, step_s: float, top: int = 12) -> str:
    """Device time of ``steps`` profiled steps, from the Perfetto trace under ``trace_dir``.

    Per device timeline (process ``/device:...``, one row per thread: a GPU's streams, 'XLA Ops',
    'XLA Modules'): events, busy time per step (union of its events, microseconds -> ms) and its
    share of the step's wall time ``step_s``; then the ``top`` names by total time on the two
    busiest timelines. A CPU backend has no device timeline: open the trace in Perfetto instead.
    """
    import json
    from collections import defaultdict

    from etils import epath

    files = sorted(epath.Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"))  # by time
    if not files:
        return f"no *.trace.json.gz under {trace_dir}"
    events = json.loads(gzip.decompress(files[-1].read_bytes()))["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"
    }
    spans: dict[str, list] = defaultdict(list)
    by_name: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        proc = procs.get(e.get("pid"), "")
        if e.get("ph") != "X" or not proc.startswith("/device:"):
            continue
        line = f"{proc} {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
        spans[line].append((e["ts"], e["ts"] + e.get("dur", 0.0)))
        by_name[line][e["name"]] += e.get("dur", 0.0)
    if not spans:
        hlo = epath.Path(trace_dir) / "cached_step.hlo.txt.gz"
        if not hlo.exists():
            return f"{files[-1].name}: no device timeline (a CPU backend): open it in Perfetto"
        text = gzip.decompress(hlo.read_bytes()).decode()
        return f"{files[-1]}\n\n{cpu_op_summary(events, text, steps)}"
    busy = {k: _busy(v) / 1e3 / steps for k, v in spans.items()}  # ms per step
    wall = 1e3 * step_s
    rows = [
        [k, f"{len(spans[k]) / steps:g}", f"{busy[k]:.2f} ms", f"{100 * busy[k] / wall:.1f}%"]
        for k in sorted(busy, key=busy.get, reverse=True)
    ]
    out = [
        f"profile: {steps} cached steps, {fmt_time(step_s)} each (median above); {files[-1]}",
        "",
        table(["device timeline", "events per step", "busy per step", "of the step"], rows),
    ]
    for k in sorted(busy, key=busy.get, reverse=True)[:2]:
        names = sorted(by_name[k].items(), key=lambda kv: kv[1], reverse=True)[:top]
        body = [
            [n[:90], f"{t / 1e3 / steps:.3f} ms", f"{100 * t / 1e3 / steps / wall:.1f}%"]
            for n, t in names
        ]
        out += ["", table([f"top on {k}", "per step", "of the step"], body)]
    return "\n".join(out)


# Model parts of an op, from the first of these found in its HLO op_name (its JAX scopes).
_PARTS = (
    ("global_diff", "GlobalDiff"),
    ("patch_diff", "PatchDiff"),
    ("clicker", "clicker"),
    ("losses", "losses"),
    ("sam.", "SAM prompt encoder + mask decoder"),
    ("prompt_encoder", "SAM prompt encoder + mask decoder"),
    ("mask_decoder", "SAM prompt encoder + mask decoder"),
)


def _op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the op_name of its metadata. A fusion whose own op_name names no
    model part (:data:`_PARTS`) takes the most common one that does among the instructions of
    the computation it calls, or without any, the most common of them if it has none itself."""
    import re
    from collections import Counter

    own: dict[str, str] = {}
    calls: dict[str, str] = {}
    inside: dict[str, Counter] = {}
    comp = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
        if head:
            comp = head.group(1)
            inside[comp] = Counter()
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        own[m.group(1)] = name.group(1) if name else ""
        if name and comp is not None:
            inside[comp][name.group(1)] += 1
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called:
            calls[m.group(1)] = called.group(1)

    def named(op: str) -> bool:
        return any(key in op for key, _ in _PARTS)

    for inst, op in own.items():
        body = inside.get(calls.get(inst, ""))
        if named(op) or not body:
            continue
        parts = [(n, o) for o, n in body.items() if named(o)]
        if parts:  # e.g. a fusion of a GlobalDiff layer labelled with its loop's scope
            own[inst] = max(parts)[1]
        elif not op:
            own[inst] = body.most_common(1)[0][0]
    return own


def cpu_op_summary(events: list[dict], hlo_text: str, steps: int) -> str:
    """Op time per model part and pass from a CPU trace: every event named after an HLO
    instruction of ``hlo_text`` (XLA:CPU's ops, on its worker threads), its own time (nested
    events subtracted), summed over the threads and grouped by the part its op_name names
    (:data:`_PARTS`) and by pass (forward; ``recompute``: train.remat's forward in the backward
    pass; backward)."""
    from collections import defaultdict

    names = _op_names(hlo_text)
    by_thread: dict[tuple, list] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            by_thread[(e["pid"], e.get("tid"))].append(e)
    own: dict[str, float] = defaultdict(float)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
        stack: list[tuple[float, str]] = []  # (end, name) of the enclosing events
        for e in evs:
            start, dur = e["ts"], e.get("dur", 0.0)
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack:
                own[stack[-1][1]] -= dur
            own[e["name"]] += dur
            stack.append((start + dur, e["name"]))
    cells: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for inst, t in own.items():
        op = names[inst]
        part = next((label for key, label in _PARTS if key in op), "other")
        if not op:  # no source location: conversions and copies XLA added (no pass column)
            part, kind = "other, no source location", "unknown"
        elif "rematted_computation" in op:
            kind = "recompute"
        else:
            kind = "backward" if "transpose(" in op else "forward"
        cells[part][kind] += t / 1e3 / steps  # ms per step
    total = sum(sum(c.values()) for c in cells.values())
    kinds = ("forward", "recompute", "backward")
    rows = [
        [part, *(f"{c[k]:.0f} ms" for k in kinds), f"{sum(c.values()):.0f} ms"]
        + [f"{100 * sum(c.values()) / total:.1f}%"]
        for part, c in sorted(cells.items(), key=lambda kv: -sum(kv[1].values()))
    ]
    head = ["part (op time per step, all threads)", *kinds, "total", "share"]
    return f"XLA:CPU op time, {fmt_time(total / 1e3)} per step\n\n{table(head, rows)}"


def profile_step(call, step_s: float, trace_dir: str, steps: int = 3) -> str:
    """Trace ``steps`` calls of the compiled step ``call()`` (median ``step_s`` s) into
    ``trace_dir``; its :func:`trace_summary`."""
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(call())
    return trace_summary(trace_dir, steps, step_s)


def global_diff_grid(cfg, batch: int) -> tuple[int, int, int, int]:
    """(B, h, w, C) of GlobalDiff's stem grid (a stride-2 stem on its working size)."""
    from samref_jax.samref.config import sam_config_from

    gd = cfg.model.refiners.global_diff
    work = int(gd.input_size or sam_config_from(cfg.model).img_size)
    return (batch, (work + 1) // 2, (work + 1) // 2, int(gd.width))


def memory_pass(shape: tuple[int, ...], runs: int) -> str:
    """Time of one elementwise float32 pass (``x * 2``: read and write) over ``shape``: the
    floor of any full-size operation on a map of that shape, to read a CPU profile against."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(shape, jnp.float32)
    double = jax.jit(lambda v: v * 2.0)
    t, _ = device_median(lambda: double(x), max(runs, 5))
    moved = 2 * x.size * 4  # bytes read + written
    return (
        f"one float32 pass (x * 2) over a {' x '.join(map(str, shape))} map (GlobalDiff's "
        f"grid): {fmt_time(t)}, {fmt_bytes(moved)} moved, {moved / t / 1e9:.1f} GB/s"
    )


def report(res: dict) -> str:
    rows, fast = res["rows"], res["rows"]["step, cached embedding"]["s"]
    mfu = not res["on_cpu"]
    head = ["part (own jit, same inputs)", "time", "share of cached step", "FLOPs", "FLOP/s"]
    head += ["memory (XLA)"] + (["MFU"] if mfu else [])
    body = []
    for name, r in rows.items():
        share = f"{100 * r['s'] / fast:.1f}%"
        rate = f"{fmt_flops(r['flops'] / r['s'])}/s" if r["flops"] == r["flops"] else "not counted"
        mem = fmt_bytes(r["memory"]) if "memory" in r else ""
        count = fmt_flops(r["flops"]) if r["flops"] == r["flops"] else "not counted"
        cells = [name, fmt_time(r["s"]), share, count, rate, mem]
        if mfu:
            good = r["mfu"] is not None and r["mfu"] == r["mfu"]
            cells.append(f"{100 * r['mfu']:.1f}%" if good else "n/a")
        body.append(cells)
    ok = lambda b: "meets" if b else "misses"  # noqa: E731
    ips, cps = res["images_per_s"], res["clicks_per_s"]
    lines = [table(head, body), ""]
    if "ratio" in res:
        lines.append(
            f"- cached step / in-step-encoder step: **{res['ratio']:.3f}x** (target <= "
            f"{TARGET_RATIO}: {ok(res['ratio'] <= TARGET_RATIO)})"
        )
    if "clicker_share" in res:
        lines.append(
            f"- clicker share of the cached step: **{100 * res['clicker_share']:.1f}%** (target "
            f"<= {100 * TARGET_CLICKER:.0f}%: {ok(res['clicker_share'] <= TARGET_CLICKER)})"
        )
    lines += [
        "- images/s: " + ", ".join(f"{v:.3f} ({k})" for k, v in ips.items()),
        "- clicks/s: " + ", ".join(f"{v:.3f} ({k})" for k, v in cps.items()),
        "- compile: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["compile_s"].items()),
        "- host page faults per step (kernel CPU time): "
        + ", ".join(
            f"{r['faults']:.0f} ({r['sys_s']:.2f} s, {k.split(', ', 1)[1]})"
            for k, r in res["rows"].items()
            if "faults" in r
        ),
    ]
    if res["on_cpu"]:
        lines.append("- MFU: not reported on a CPU")
    elif res["peak"] is None:
        lines.append("- MFU: n/a (device not in PEAK_FLOPS)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sam", default="vit_b", help="SAM type of the recipe (vit_b, tiny, ...)")
    ap.add_argument("--frame", type=int, default=None, help="frame side (default: SAM's)")
    ap.add_argument("--rounds", type=int, default=None, help="T (default: the recipe's 6)")
    ap.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1],
        help="images per device (several only with --parts memory)",
    )
    ap.add_argument(
        "--parts",
        choices=("all", "cached", "memory"),
        default="all",
        help="all parts and both steps; the cached-embedding step alone; or compile-only memory",
    )
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the recipe's, bfloat16)")
    ap.add_argument(
        "--remat",
        type=int,
        choices=(0, 1),
        default=None,
        help="1/0: recompute each round in the backward pass or not (default: the recipe's)",
    )
    ap.add_argument(
        "--remat-policy",
        default=None,
        help="train.remat_policy: what remat keeps (a jax.checkpoint_policies name, e.g. "
        "dots_saveable; default: the recipe's, nothing_saveable)",
    )
    ap.add_argument(
        "--mode",
        choices=("sam", "global", "full"),
        default=None,
        help="model mode (default: the recipe's full; sam: SAM's decoder alone, a lower bound)",
    )
    ap.add_argument(
        "--global-size",
        type=int,
        default=None,
        help="GlobalDiff working square (default: the recipe's; 0: the whole frame)",
    )
    ap.add_argument(
        "--flops",
        type=int,
        choices=(0, 1),
        default=1,
        help="0: no model-FLOP count (lowering each part for the CPU takes a minute at vit_b)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="then trace 3 cached steps into DIR (Perfetto) and print device time by operation",
    )
    ap.add_argument(
        "--runs", type=int, default=3, help="timed runs per part after a first call (0: time it)"
    )
    ap.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's malloc settings (host.py)"
    )
    ap.add_argument(
        "--single-arena",
        action="store_true",
        help="host.py's single-arena setting (SAMREF_SINGLE_ARENA=1): no page faults per step",
    )
    a = ap.parse_args(argv)

    from benchmarks._common import host_setup, machine_line

    host_setup(a.default_malloc, a.single_arena)

    t0 = time.perf_counter()
    if a.parts == "memory":
        print()
        print(run_memory(a))
        print(machine_line())
        return 0
    if len(a.batch) != 1:
        ap.error("several --batch values only with --parts memory")
    a.batch = a.batch[0]
    res = run(a)
    print()
    print(res["desc"])
    print(machine_line() + (f" cpu='{cpu_model()}'" if res["on_cpu"] else ""))
    print()
    print(report(res))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, peak RSS {peak:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
