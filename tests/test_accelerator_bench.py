"""``benchmarks/accelerator.py --smoke`` and ``benchmarks/train_step.py`` at tiny sizes run on
the CPU and print their tables (the full vit_b runs are benchmarks, not tests); the step's
model-FLOP count."""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks.accelerator import PEAK_FLOPS, peak_key, train_step_flops
from tests.fake_devices import run_python


def test_peak_table_lookup():
    cases = {
        "NVIDIA H100 80GB HBM3": "NVIDIA H100 SXM",
        "NVIDIA H100 PCIe": "NVIDIA H100 PCIe",
        "NVIDIA H200": "NVIDIA H200",
        "NVIDIA A100-SXM4-80GB": "NVIDIA A100",
        "NVIDIA L4": "NVIDIA L4",
        "NVIDIA L40S": None,
        "TPU v4": "TPU v4",
        "TPU v5 lite": "TPU v5e",
        "TPU v5p": "TPU v5p",
        "TPU v6 lite": "TPU v6e",
        "cpu": None,
    }
    for kind, want in cases.items():
        assert peak_key(kind) == want, kind
        assert want is None or PEAK_FLOPS[want] > 1e14


@pytest.mark.slow
def test_accelerator_benchmark_smoke_on_cpu():
    out = run_python(["benchmarks/accelerator.py", "--smoke"], 600, {"JAX_PLATFORMS": "cpu"})
    for needle in (
        "image encoder",
        "float32",
        "bfloat16",
        "mode sam",
        "mode full",
        "images/s",
        "clicks/s",
        "MFU",
        "TPU v5p",
        "NVIDIA H100 SXM",
    ):
        assert needle in out, (needle, out[-3000:])


@pytest.mark.slow
def test_train_step_flops_count_every_round_once():
    """Model FLOPs of the training step grow with T (the rounds' loop is unrolled for the count,
    since XLA's analysis counts a loop body once) and leave out remat's recomputation."""
    import jax

    from samref_jax.training import step as S
    from samref_jax.training.testing import synthetic_batch, tiny_test_config

    def count(rounds: int, remat: bool) -> float:
        cfg = tiny_test_config("full", 64, rounds=rounds)
        cfg.train.remat = remat
        params = S.init_params(cfg, jax.random.key(0, impl="rbg"))
        state = S.create_state(cfg, params, 0)
        return train_step_flops(cfg, state, synthetic_batch(1, 64, seed=0))

    one, two, three = count(1, False), count(2, False), count(3, False)
    # Rounds 2 and 3 are the same program (round 1 also picks among SAM's multimask outputs).
    d2, d3 = two - one, three - two
    assert d2 > 0 and abs(d3 - d2) < 0.02 * d2, (one, two, three)
    assert count(3, True) == three


@pytest.mark.slow
def test_train_step_benchmark_smoke_on_cpu():
    args = ["--sam", "tiny", "--frame", "64", "--rounds", "2", "--runs", "0", "--global-size", "32"]
    out = run_python(["benchmarks/train_step.py", *args], env={"JAX_PLATFORMS": "cpu"})
    rows = ("| encoder |", "| click rounds |", "| step, cached embedding |", "memory (XLA)")
    faults = "host page faults per step (kernel CPU time): "
    for needle in (
        *rows,
        "cached step / in-step-encoder step",
        "GlobalDiff working size 32,",
        faults,
    ):
        assert needle in out, (needle, out[-3000:])


def _mib(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"MiB": 1.0, "GiB": 1024.0}[unit]


@pytest.mark.slow
def test_train_step_benchmark_cached_part_and_memory_table(tmp_path):
    """``--parts cached`` times the cached-embedding step alone (``--profile`` then traces it);
    ``--parts memory`` compiles both steps at each batch without running them, and the
    temporaries grow with the batch."""
    tiny = ["--sam", "tiny", "--frame", "64", "--rounds", "2", "--global-size", "32"]
    # A fresh compilation cache: an executable loaded from the suite's cache keeps the op
    # names (JAX scopes) of the code that compiled it, which the profile summary reads.
    env = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    prof = tmp_path / "prof"
    out = run_python(
        ["benchmarks/train_step.py", *tiny, "--parts", "cached", "--runs", "0"]
        + ["--profile", str(prof)],
        env=env,
    )
    assert "| step, cached embedding |" in out and "| encoder |" not in out, out[-3000:]
    assert "images/s: " in out and "cached step / in-step" not in out, out[-3000:]
    assert len(list(prof.glob("plugins/profile/*/*.trace.json.gz"))) == 1, out[-3000:]
    assert b"HloModule" in gzip.decompress((prof / "cached_step.hlo.txt.gz").read_bytes())
    # A CPU has no device timeline: op time per model part from the trace and the HLO.
    assert "XLA:CPU op time" in out, out[-3000:]
    for part in ("GlobalDiff", "PatchDiff", "clicker", "losses"):
        assert f"| {part} |" in out, (part, out[-3000:])
    # The reference pass: GlobalDiff's grid at --global-size 32 is 16 x 16 x 32 (width 32).
    assert "one float32 pass (x * 2) over a 1 x 16 x 16 x 32 map" in out, out[-3000:]
    out = run_python(
        ["benchmarks/train_step.py", *tiny, "--parts", "memory", "--batch", "1", "2"],
        env={"JAX_PLATFORMS": "cpu"},
    )
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("1", "2") and len(cells) == 6:
            rows[int(cells[0])] = cells
    assert set(rows) == {1, 2}, out[-3000:]
    for col in (1, 3):  # temporaries: encoder in the step, cached embedding
        assert _mib(rows[2][col]) > 1.5 * _mib(rows[1][col]), rows


def test_trace_summary_of_a_device_timeline(tmp_path):
    """Busy time is the union of a timeline's events (overlaps counted once), per profiled
    step, against the step's wall time; host events are left out."""
    import json

    from benchmarks.train_step import trace_summary

    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
    ]
    ev = lambda pid, ts, dur, name: {
        "ph": "X",
        "pid": pid,
        "tid": 7,
        "ts": ts,
        "dur": dur,
        "name": name,
    }  # noqa: E731
    events = meta + [
        ev(1, 0.0, 5000.0, "host work"),
        ev(2, 0.0, 1000.0, "fusion.1"),
        ev(2, 500.0, 1000.0, "gemm"),  # overlaps fusion.1 by 500 us
        ev(2, 3000.0, 1000.0, "fusion.1"),
    ]
    run = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    (run / "h.trace.json.gz").write_bytes(
        gzip.compress(json.dumps({"traceEvents": events}).encode())
    )
    out = trace_summary(str(tmp_path), steps=2, step_s=0.01)  # 2 steps of 10 ms
    line = next(x for x in out.splitlines() if x.startswith("| /device:GPU:0 Stream #7"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:] == ["1.5", "1.25 ms", "12.5%"], out  # (1500 + 1000) us / 2 steps
    assert "| fusion.1 | 1.000 ms | 10.0% |" in out and "host work" not in out, out


def test_cpu_op_summary_own_time_by_part_and_pass():
    """Own time of each op (nested ops subtracted) per model part and pass; a fusion without
    metadata takes the op_name of the computation it calls; events that are not HLO
    instructions are left out."""
    from benchmarks.train_step import cpu_op_summary

    hlo = "\n".join(
        [
            "%fused_computation.1 (p: f32[4]) -> f32[4] {",
            '  %m = f32[4] multiply(%p, %p), metadata={op_name="jit(step)/transpose(jvp())/'
            'SamRef._round/global_diff/refiner/mul"}',
            "}",
            "ENTRY %main (a: f32[4]) -> f32[4] {",
            "  %fusion.1 = f32[4] fusion(%a), kind=kLoop, calls=%fused_computation.1",
            '  %dot.2 = f32[4] dot(%a, %a), metadata={op_name="jit(step)/jvp()/SamRef._round/'
            'sam.predict_masks/dot"}',
            '  %sel.3 = f32[4] select(%a, %a), metadata={op_name="jit(step)/transpose(jvp())/'
            'rematted_computation/clicker/select_n"}',
            "}",
        ]
    )
    ev = lambda tid, ts, dur, name: dict(ph="X", pid=1, tid=tid, ts=ts, dur=dur, name=name)  # noqa: E731
    events = [
        ev(1, 0.0, 10000.0, "ThunkExecutor::Execute"),  # not an instruction: ignored
        ev(1, 0.0, 6000.0, "fusion.1"),
        ev(1, 1000.0, 2000.0, "dot.2"),  # nested in fusion.1 on the same thread
        ev(2, 0.0, 4000.0, "sel.3"),
    ]
    out = cpu_op_summary(events, hlo, steps=2)  # (4 + 2 + 4) ms of own time over 2 steps
    assert "XLA:CPU op time, 5.0 ms per step" in out, out
    assert "| GlobalDiff | 0 ms | 0 ms | 2 ms | 2 ms | 40.0% |" in out, out
    assert "| SAM prompt encoder + mask decoder | 1 ms | 0 ms | 0 ms | 1 ms | 20.0% |" in out
    assert "| clicker | 0 ms | 2 ms | 0 ms | 2 ms | 40.0% |" in out, out


def test_accelerator_run_script_parses_and_names_existing_benchmarks():
    """The device script is only run where an accelerator is lent: check here that bash parses
    it and that every benchmark it calls exists."""
    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "accelerator_run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    called = set(re.findall(r"python3 (benchmarks/\w+\.py)", script.read_text()))
    assert {"benchmarks/train_step.py", "benchmarks/accelerator.py"} <= called, called
    for rel in called:
        assert (repo / rel).is_file(), rel
    # Every option the script gives train_step.py through its step() calls is one it takes.
    source = (repo / "benchmarks" / "train_step.py").read_text()
    joined = script.read_text().replace("\\\n", " ")  # continued lines joined
    calls = re.findall(r"^\s*step .*$", joined, re.M)
    flags = {f for call in calls for f in re.findall(r"\s(--[a-z][a-z-]*)", call)}
    assert {"--remat", "--remat-policy", "--batch"} <= flags, flags
    for flag in flags:
        assert f'"{flag}"' in source, flag
