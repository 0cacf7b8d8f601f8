"""Shared fixtures: real benchmark folders (``SAMREF_DATA_DIR``, default ``../shared/data``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` without an installed package
    sys.path.insert(0, str(REPO))

# Compiled programs persist between runs (as tests/run_all.sh sets it): a second run of the fast
# subset loads them instead of compiling. JAX_COMPILATION_CACHE_DIR chooses another folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding the real datasets (``GrabCut/``, ``COCO_MVal/``)."""
    return Path(os.environ.get("SAMREF_DATA_DIR", REPO.parent / "shared" / "data"))


def _dataset(data_dir: Path, name: str, marker: str) -> Path:
    root = data_dir / name
    if not (root / marker).is_dir():
        if os.environ.get("CI"):  # CI has the data beside the clone: never skip silently there
            pytest.fail(f"{name} not found at {root} (set SAMREF_DATA_DIR)")
        pytest.skip(f"{name} not found at {root} (set SAMREF_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def grabcut_dir(data_dir: Path) -> Path:
    """The real GrabCut benchmark (50 images), skipped if absent."""
    return _dataset(data_dir, "GrabCut", "boundary_GT")


@pytest.fixture(scope="session")
def coco_mval_dir(data_dir: Path) -> Path:
    """The real COCO_MVal set (800 instances), skipped if absent."""
    return _dataset(data_dir, "COCO_MVal", "gt")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight tiny SAM-REF checkpoint directory (``SAMREF_TEST_CHECKPOINT`` overrides).

    Used by the CLI, demo-app and notebook tests until the bundled ``tiny`` model exists.
    """
    given = os.environ.get("SAMREF_TEST_CHECKPOINT")
    if given:
        return Path(given)
    import jax

    from samref_jax.samref.config import samref_model_config
    from samref_jax.samref.io import save_samref
    from samref_jax.samref.model import init_samref_params

    cfg = samref_model_config("tiny")
    # jit: about 3x faster than the op-by-op init on CPU; rbg keys compile fast.
    params = jax.jit(lambda k: init_samref_params(cfg, k))(jax.random.key(0, impl="rbg"))
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random"
    save_samref(path, params, cfg)
    return path


@pytest.fixture(scope="session")
def jax_cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses (CLI, demo app, notebook kernel): a JAX compilation cache
    shared by them, so each process does not recompile the same SAM-REF step."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
    return {
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
