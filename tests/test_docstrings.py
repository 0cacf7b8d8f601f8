"""The examples in the library's docstrings run and print what they say (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import samref_jax

# Modules that need optional extras at import time (the demo needs gradio).
_OPTIONAL = {"samref_jax.demo.app"}


def _walk() -> list[pkgutil.ModuleInfo]:
    return list(pkgutil.walk_packages(samref_jax.__path__, "samref_jax."))


def _modules_with_examples() -> list[str]:
    names = []
    for info in [pkgutil.ModuleInfo(None, "samref_jax", True), *_walk()]:
        if info.name in _OPTIONAL:
            continue
        module = importlib.import_module(info.name)
        tests = doctest.DocTestFinder(exclude_empty=True).find(module)
        if any(t.examples for t in tests):
            names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_examples_found():
    # The public entry points document themselves with runnable examples.
    for name in ("samref_jax", "samref_jax.samref.predictor", "samref_jax.sam.common"):
        assert name in MODULES, name


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
