"""Multi-process training on one machine (docs/design.md, 'Multi-process training'):
``jax.distributed`` over localhost with gloo collectives, N processes x M CPU devices, started
by ``samref_jax.training.launch`` (``train/launch_local.py``) running the unchanged entry point
``train.main``.

Runs (the tiniest trainable config: ``sam`` mode, whose step compiles fastest -- the
multi-process machinery does not depend on the model --, 64 frame, one encoder block, T=2
rounds, global batch 8, 4 steps, checkpoints every 2 steps), all sharing one persistent
compilation cache (only process 0 writes it, so the others compile in every multi-process run),
each evaluating the held-out images after steps 2 and 4 (process 0 alone; the others wait at a
barrier of the coordination service):

* ``one``: 1 process x 8 devices;
* ``two``: 2 processes x 4 devices, uninterrupted;
* ``four``: 4 processes x 2 devices, uninterrupted (more than two hosts: every process reads
  its quarter of the global batch, collectives over four);
* ``killed``: 2 x 4, every process SIGKILLed right after the step-2 checkpoint, then restarted;
* ``preempted``: 4 x 2, process 3 alone gets SIGTERM (a preemption notice) after step 1; all
  four checkpoint one agreed step and exit with 143, then the same command resumes.

The cached-embedding path of a pod: ``cache_embeddings`` in 4 processes x 1 device, then
training on that cache in 2 processes x 2 devices against 1 process x 4 devices.

An error in one of 2 processes (``--fail_after_step``) ends the run at once with its traceback.

Besides, ``mp_checkpoint_worker.py`` checks the checkpointer's background saves in 2 processes
x 2 devices (donation right after ``save``; a kill during the write).

Every subprocess has a hard timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # training runs in several processes
RUN_TIMEOUT_S = 600  # one training run (compiles dominate on a loaded 2-core CPU)

_CONFIG = textwrap.dedent(
    """
    from samref_jax.training.testing import tiny_test_config

    def get_config():
        c = tiny_test_config("sam", 64, rounds=2)  # no refiners: the cheapest compile
        c.data.per_device_batch_size = 1  # global batch 8 on 8 devices
        c.data.heldout_every = 5  # images 0 and 5 held out: 8 train the model
        c.model.max_clicks = 5  # 5 clicks per held-out object: NoC and 5-mIoU
        c.eval.every_steps, c.eval.num_samples, c.eval.max_clicks = 2, 2, 5  # process 0
        c.data.manual_dir = {manual!r}
        c.data.data_dir = {data!r}
        c.train.num_steps = 4
        c.train.checkpoint_every_steps = 2
        c.train.log_every = 1
        c.train.max_minutes = 600.0  # agreed on by the processes before every step
        return c
    """
)


_CACHED_CONFIG = textwrap.dedent(
    """
    from samref_jax.training.testing import tiny_test_config

    def get_config():
        c = tiny_test_config("sam", 64, rounds=2)
        c.train.trainable = ("sam/mask_decoder", "sam/prompt_encoder")  # a frozen encoder
        c.data.per_device_batch_size = 1
        c.data.heldout_every = 0
        c.data.manual_dir = {manual!r}
        c.data.data_dir = {data!r}
        c.data.cached_views = 2
        c.data.cache_dtype = "float32"
        c.train.num_steps = 3
        c.train.checkpoint_every_steps = 0
        c.train.log_every = 1
        return c
    """
)


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    return env


def _launch(
    args: list[str],
    n: int,
    m: int,
    env: dict[str, str],
    module: str = "train.main",
    timeout_s: float = RUN_TIMEOUT_S,
) -> tuple[int, str]:
    """``module`` in ``n`` processes x ``m`` devices: (exit status, their output)."""
    from samref_jax.training.launch import launch

    lines: list[str] = []
    with open(os.devnull, "w") as sink:
        rc = launch(
            args, n, m, module=module, timeout_s=timeout_s, env=env, output=sink, capture=lines
        )
    return rc, "".join(lines)


def _train_one_process(args: list[str], devices: int, env: dict[str, str]) -> None:
    """``train.main`` in this machine's one process with ``devices`` CPU devices (no
    ``jax.distributed``); fails the test unless it exits with 0."""
    r = subprocess.run(
        [sys.executable, "-m", "train.main", *args],
        env={**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _rows(workdir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (workdir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of the three runs (module docstring), in that order."""
    from samref_jax.training.testing import write_fake_coco_mval

    root = tmp_path_factory.mktemp("mp")
    manual = write_fake_coco_mval(root / "COCO_MVal", n=10)
    cfg = root / "config.py"
    cfg.write_text(_CONFIG.format(manual=str(manual), data=str(root / "tfds")))
    env = _env(root / "jax_cache")
    common = ["--config", str(cfg), "--noprogress"]

    # 1 process x 8 devices: the plain entry point, no jax.distributed.
    one = root / "one"
    _train_one_process([*common, "--workdir", str(one)], 8, env)

    two = root / "two"
    rc, out = _launch([*common, "--workdir", str(two)], 2, 4, env)
    assert rc == 0, out[-5000:]

    four = root / "four"
    rc, out = _launch([*common, "--workdir", str(four)], 4, 2, env)
    assert rc == 0, out[-5000:]

    killed = root / "killed"
    rc, out = _launch([*common, "--workdir", str(killed), "--kill_after_step", "2"], 2, 4, env)
    assert rc == -9, (rc, out[-5000:])  # SIGKILL, as a crash
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == ["2"], ckpts
    assert [r["step"] for r in _rows(killed)] == [1, 2]
    rc, out = _launch([*common, "--workdir", str(killed)], 2, 4, env)
    assert rc == 0, out[-5000:]
    assert "resumed from step 2" in out, out[-3000:]

    pre = root / "preempted"
    rc, out = _launch([*common, "--workdir", str(pre), "--preempt_after_step", "1"], 4, 2, env)
    assert rc == 143, (rc, out[-5000:])
    stopped = [r["step"] for r in _rows(pre)]
    ckpts = sorted(int(p.name) for p in (pre / "checkpoints").iterdir() if p.name.isdigit())
    assert not (pre / "export").exists()
    rc, out = _launch([*common, "--workdir", str(pre)], 4, 2, env)
    assert rc == 0, out[-5000:]
    return one, two, four, killed, (pre, stopped, ckpts, out)


def test_two_processes_match_one_process(runs):
    """2 processes x 4 devices == 1 process x 8 devices: same global batches (each process
    reads its part), same initialisation, losses equal up to the cross-process reduction
    order. Only process 0 logs; every process takes part in the checkpoints and the export."""
    one, two, *_ = runs
    _assert_same_run(one, two)


def test_four_processes_match_one_process(runs):
    """4 processes x 2 devices == 1 process x 8 devices, as for two processes: nothing assumes
    that a run has at most two hosts (data split, collectives, checkpoints, export)."""
    one, _, four, *_ = runs
    _assert_same_run(one, four)


def _assert_same_run(one: Path, other: Path) -> None:
    a, b = _rows(one), _rows(other)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(rb["iou"], ra["iou"], atol=2e-3)
    # Gradients: before the float differences can move a simulated click (a discrete choice
    # that changes the next steps' gradients by ~1% while the losses agree to ~1e-5).
    for ra, rb in zip(a[:2], b[:2], strict=True):
        np.testing.assert_allclose(rb["grad_norm"], ra["grad_norm"], rtol=1e-4)
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((other / "summary.json").read_text())
    assert s1["global_batch"] == s2["global_batch"] == 8 and s2["devices"] == 8
    assert (other / "export" / "metadata.json").is_file()


def test_periodic_evaluation_on_process_zero(runs):
    """Process 0 evaluates after steps 2 and 4 while the others wait (no collective times out
    meanwhile); resumed runs keep one row per step; the NoCs of the same model agree."""
    one, two, four, killed, (pre, *_) = runs
    evals = {w.name: _rows(w, "eval.jsonl") for w in (one, two, four, killed, pre)}
    for name, rows in evals.items():
        assert [r["step"] for r in rows] == [2, 4], (name, rows)
        assert all(r["num_samples"] == 2 and 1 <= r["NoC@85"] <= r["NoC@90"] <= 5 for r in rows)
        assert all(0.0 <= r["5-mIoU"] <= 1.0 for r in rows), (name, rows)
    for name in ("two", "four"):  # the same model up to the 2e-4 of the losses
        for ra, rb in zip(evals["one"], evals[name], strict=True):
            assert abs(ra["NoC@90"] - rb["NoC@90"]) <= 0.5, (name, ra, rb)
            assert abs(ra["5-mIoU"] - rb["5-mIoU"]) <= 0.02, (name, ra, rb)


def test_killed_two_process_run_resumes_with_identical_losses(runs):
    """Every process SIGKILLed after the step-2 checkpoint, restarted: steps 3 and 4 have the
    losses of the uninterrupted 2-process run (restored params, optimiser, data position)."""
    _, two, _, killed, _ = runs
    a, b = _rows(two), _rows(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "iou", "grad_norm"):
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_preemption_notice_on_one_process_stops_all_at_one_step(runs):
    """SIGTERM to process 3 of 4 only: every process stops after the same step (the one JAX's
    preemption service agrees on: the step after the notice at most), checkpoints it, skips the
    export and exits 143; the rerun resumes there with the uninterrupted run's losses."""
    _, _, four, _, (pre, stopped, ckpts, out) = runs
    s = stopped[-1]
    assert s in (2, 3) and stopped == list(range(1, s + 1)), stopped
    assert ckpts[-1] == s, ckpts  # the agreed step, written by all four (orbax: collective)
    assert f"resumed from step {s}" in out, out[-3000:]
    a, b = _rows(four), _rows(pre)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "iou", "grad_norm"):
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert (pre / "export" / "metadata.json").is_file()


def test_one_failing_process_ends_the_run_at_once(tmp_path):
    """An error in process 1 of 2 alone (``--fail_after_step``): it prints its traceback and
    exits with status 1 at once, and the launcher stops process 0, which waits for it in the
    next step. Left to Python, process 1 would wait 300 s at JAX's shutdown barrier (past this
    test's 240 s limit: status 124) and then every process would abort."""
    from samref_jax.training.testing import write_fake_coco_mval

    manual = write_fake_coco_mval(tmp_path / "COCO_MVal", n=10)
    cfg = tmp_path / "config.py"
    cfg.write_text(_CONFIG.format(manual=str(manual), data=str(tmp_path / "tfds")))
    args = ["--config", str(cfg), "--noprogress", "--workdir", str(tmp_path / "w")]
    env = _env(tmp_path / "jax_cache")
    rc, out = _launch([*args, "--fail_after_step", "1"], 2, 2, env, timeout_s=240)
    assert rc == 1, (rc, out[-5000:])
    assert "process 1 failed:" in out, out[-3000:]
    assert "fail_after_step: an error after step 1" in out, out[-3000:]


def test_unreachable_coordinator_fails_fast_with_message(tmp_path):
    """Process 1 of 2 with nobody at the coordinator address exits (status 3) with a plain
    message within about --init_timeout, instead of hanging or aborting."""
    from samref_jax.training.launch import free_port

    env = _env(tmp_path / "cache")
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID="1",
    )
    cfg = tmp_path / "config.py"
    cfg.write_text(_CONFIG.format(manual=str(tmp_path / "none"), data=str(tmp_path / "tfds")))
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.main",
            "--config",
            str(cfg),
            "--workdir",
            str(tmp_path / "w"),
            "--init_timeout",
            "5",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    assert "could not reach the JAX coordinator" in r.stderr, r.stderr[-3000:]
    assert time.monotonic() - t0 < 170
    assert not (tmp_path / "w").exists()


def test_coordinator_alone_fails_with_message(tmp_path):
    """Process 0 whose peers never join: JAX ends it (bounded by --init_timeout) and the
    reason is printed first."""
    from samref_jax.training.launch import free_port

    env = _env(tmp_path / "cache")
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID="0",
    )
    code = (
        "import sys; from samref_jax.training import distributed as d; "
        "d.initialize(timeout_s=4); print('joined')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert r.returncode != 0 and "joined" not in r.stdout
    assert "not all 2 processes joined the JAX coordinator" in r.stderr, r.stderr[-3000:]


def test_cache_built_by_four_processes_trains_two(tmp_path):
    """The cached-embedding path of a pod: ``cache_embeddings`` in 4 processes x 1 device
    (process 0 prepares the records while the others wait; shards dealt round-robin; process 0
    writes the metadata once every shard is there) writes the records a one-process build
    writes; training on it in 2 processes x 2 devices has the losses of 1 process x 4."""
    import importlib.util

    import jax

    from samref_jax.training import step as S
    from samref_jax.training.embedding_cache import CachedViews, build_cache, open_cache
    from samref_jax.training.pipeline import prepare_source
    from samref_jax.training.testing import write_fake_coco_mval

    manual = write_fake_coco_mval(tmp_path / "COCO_MVal", n=6)
    data = tmp_path / "tfds"
    cfg_file = tmp_path / "cached.py"
    cfg_file.write_text(_CACHED_CONFIG.format(manual=str(manual), data=str(data)))
    env = _env(tmp_path / "jax_cache")
    rc, out = _launch(
        ["--config", str(cfg_file), "--records_per_shard", "2", "--noprogress"],
        4,
        1,
        env,
        module="samref_jax.training.cache_embeddings",
    )
    assert rc == 0, out[-5000:]
    assert "6 instances x 2 views" in out, out[-3000:]

    spec = importlib.util.spec_from_file_location("cached_config", cfg_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    params = S.init_params(cfg, jax.random.key(int(cfg.seed), impl="rbg"))
    build_cache(cfg, prepare_source(cfg, data), tmp_path / "one_process", params)
    cfg.data.use_cached_embeddings = True
    a, b = open_cache(cfg, data), CachedViews(tmp_path / "one_process")
    assert len(a) == len(b) == 12
    for r in range(len(a)):
        x, y = a[r], b[r]
        assert list(x) == list(y)
        for k in x:
            if k == "embedding":
                np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)

    common = [
        "--config",
        str(cfg_file),
        "--config.data.use_cached_embeddings=True",
        "--noprogress",
    ]
    _train_one_process([*common, "--workdir", str(tmp_path / "w1")], 4, env)
    rc, out = _launch([*common, "--workdir", str(tmp_path / "w2")], 2, 2, env)
    assert rc == 0, out[-5000:]
    one, two = _rows(tmp_path / "w1"), _rows(tmp_path / "w2")
    assert [x["step"] for x in one] == [x["step"] for x in two] == [1, 2, 3]
    for ra, rb in zip(one, two, strict=True):
        assert np.isfinite(ra["loss"])
        np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(rb["iou"], ra["iou"], atol=2e-3)


def _checkpoint_worker(mode: str, folder: Path, env: dict[str, str]) -> tuple[int, str]:
    module = "tests.training.mp_checkpoint_worker"
    return _launch([mode, str(folder)], 2, 2, env, module=module, timeout_s=300)


def test_two_process_background_checkpoints_survive_donation_and_a_kill(tmp_path):
    """Two processes x 2 devices save a sharded state in the background
    (``TrainCheckpointer``, tests/training/mp_checkpoint_worker.py): the arrays donated right
    after ``save`` are checkpointed with their values; every process SIGKILLed right after
    ``save`` returns, while the files are written, leaves a whole checkpoint, which a restart
    restores on both processes and writes the next step over."""
    env = _env(tmp_path / "cache")
    rc, out = _checkpoint_worker("donate", tmp_path / "donate", env)
    assert rc == 0, out[-5000:]
    assert out.count("ok 2") == 2, out[-3000:]

    folder = tmp_path / "killed"
    rc, out = _checkpoint_worker("kill", folder, env)
    assert rc == -9, (rc, out[-5000:])
    rc, out = _checkpoint_worker("resume", folder, env)
    assert rc == 0, out[-5000:]
    resumed = sorted(w[-1] for w in map(str.split, out.splitlines()) if w[-2:-1] == ["resumed"])
    assert resumed in (["1", "1"], ["2", "2"]), out[-3000:]
    assert out.count(f"ok {int(resumed[0]) + 1}") == 2, out[-3000:]
