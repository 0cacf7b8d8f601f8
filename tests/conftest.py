"""Shared fixtures: real benchmark folders (``SAMREF_DATA_DIR``, default ``../shared/data``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` without an installed package
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding the real datasets (``GrabCut/``, ``COCO_MVal/``)."""
    return Path(os.environ.get("SAMREF_DATA_DIR", REPO.parent / "shared" / "data"))


def _dataset(data_dir: Path, name: str, marker: str) -> Path:
    root = data_dir / name
    if not (root / marker).is_dir():
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
