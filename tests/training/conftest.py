"""Fixtures of the training tests."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Persistent compilation cache for one test module (its trainer runs reuse the step)."""
    d = tmp_path_factory.mktemp("jax_cache")
    old = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield d
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
