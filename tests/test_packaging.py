"""The built wheel (what `pip install git+...` and Colab install) holds the whole library and runs.

CI installs the package in editable mode, which never exercises packaging: a sub-package without
``__init__.py`` is silently left out of the wheel by ``packages = find:``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds and installs a wheel


def _files(*paths: str) -> list[str]:
    """The working tree's files, tracked or untracked but not ignored (what a commit would hold)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of those files, never from the checkout itself: a stale build/ folder
    # there would hide a missing package.
    src = tmp_path_factory.mktemp("src")
    for name in _files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("samref_jax-*.whl")
    return whl


def test_wheel_holds_every_module_and_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = _files("samref_jax", "configs", "train")
    assert "samref_jax/samref/predictor.py" in files
    assert any(f.startswith("samref_jax/assets/checkpoints/tiny-sam/") for f in files)
    missing = sorted(set(files) - names)
    assert not missing, f"not in {wheel.name}: {missing}"


def test_bundled_model_runs_from_the_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import numpy as np, samref_jax.samref.predictor as m\n"
        f"assert m.__file__.startswith({str(site)!r}), m.__file__\n"
        "p = m.SamRefPredictor.from_checkpoint('tiny')\n"
        "p.set_image(np.zeros((40, 60, 3), np.uint8))\n"
        "print(p.click(30, 20).mask.shape)\n"
    )
    # The unpacked wheel first on the path; the dependencies come from this environment.
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(40, 60)")
