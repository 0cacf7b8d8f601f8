"""``notebooks/samref_demo.ipynb`` executes headless (nbclient) top to bottom, offline, with a
small model, and produces its figures.

The notebook gets ``SAMREF_OFFLINE=1`` (no download is tried), ``SAMREF_SKIP_INSTALL=1`` and
``SAMREF_CHECKPOINT`` (a random tiny checkpoint until the bundled ``tiny`` exists; set
``SAMREF_TEST_CHECKPOINT=tiny`` to use the bundled one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "samref_demo.ipynb"


def _outputs(nb, kind: str | None = None):
    for cell in nb.cells:
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                if kind is None or out.get("output_type") == kind:
                    yield cell, out


def test_notebook_is_valid_and_ends_with_training_command():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert not list(_outputs(nb)), "commit the notebook without outputs"
    assert "python -m train.main --config configs/tiny_cpu.py --workdir runs/tiny" in (
        nb.cells[-1].source
    )


@pytest.mark.slow
def test_notebook_runs_offline(tiny_checkpoint, jax_cache_env, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    env = {
        **jax_cache_env,
        "SAMREF_OFFLINE": "1",
        "SAMREF_SKIP_INSTALL": "1",
        "SAMREF_CHECKPOINT": str(tiny_checkpoint),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        # No network: anything that still tried to connect would fail fast.
        "http_proxy": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    print(f"\nnotebook executed in {elapsed:.1f} s")
    nbformat.write(nb, tmp_path / "executed.ipynb")

    assert not list(_outputs(nb, "error"))
    text = "".join("".join(out.get("text", "")) for _, out in _outputs(nb, "stream"))
    assert "SAMREF_CHECKPOINT" in text, text
    assert "click 4:" in text, text
    assert "full  mIoU@k:" in text and "sam   mIoU@k:" in text, text
    figures = [out for _, out in _outputs(nb, "display_data") if "image/png" in out["data"]]
    assert len(figures) >= 2, f"expected the per-click figure and the mIoU plot, got {len(figures)}"
    assert not (tmp_path / "checkpoints").exists(), "nothing may be downloaded offline"
