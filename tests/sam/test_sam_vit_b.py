"""Full-size vit_b parity, end to end through the real file format.

Official vit_b with EVERY parameter randomised -> torch.save -> `convert_weights.py` in a
subprocess -> `load_sam` -> our `SamPredictor` vs the official `SamPredictor` on a real GrabCut
image. About a minute and ~5 GB on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samref_jax.data.decode import read_image
from samref_jax.sam.build import load_sam
from samref_jax.sam.config import sam_config
from samref_jax.sam.predictor import SamPredictor
from tests.sam_reference import random_torch_sam, segment_anything, torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # full-size vit_b models (torch and JAX)


@pytest.fixture(scope="module")
def predictors(tmp_path_factory, grabcut_dir):
    tmp = tmp_path_factory.mktemp("vit_b")
    ts = random_torch_sam(sam_config("vit_b"), seed=3)
    pth = tmp / "sam_vit_b_random.pth"
    torch.save(ts.state_dict(), pth)
    out = tmp / "converted"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "convert_weights.py"),
            "--checkpoint",
            str(pth),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    image = read_image(sorted((grabcut_dir / "data_GT").glob("*"))[0])
    official = segment_anything.SamPredictor(ts)
    official.set_image(image)
    ours = SamPredictor(load_sam(out))
    ours.set_image(image)
    return official, ours, image


def test_image_embedding(predictors):
    official, ours, _ = predictors
    ref = official.get_image_embedding().numpy()
    got = ours.get_image_embedding()
    assert got.shape == ref.shape == (1, 256, 64, 64)
    print(f"\n[parity vit_b] image embedding max abs diff {np.abs(got - ref).max():.2e}")
    assert np.abs(got - ref).max() <= 1e-4


def _prompt_sets(image):
    h, w = image.shape[:2]
    pts = np.array([[w * 0.5, h * 0.5], [w * 0.3, h * 0.6], [w * 0.7, h * 0.2]])
    box = np.array([w * 0.2, h * 0.15, w * 0.8, h * 0.9])
    return {
        "one point": dict(point_coords=pts[:1], point_labels=np.array([1])),
        "points with labels": dict(point_coords=pts, point_labels=np.array([1, 0, 1])),
        "box": dict(box=box),
        "points + box": dict(point_coords=pts[:2], point_labels=np.array([1, 0]), box=box),
    }


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_matches_official(predictors, multimask):
    official, ours, image = predictors
    for name, kw in _prompt_sets(image).items():
        ref_m, ref_s, ref_low = official.predict(multimask_output=multimask, **kw)
        m, s, low = ours.predict(multimask_output=multimask, **kw)
        assert m.shape == ref_m.shape and low.shape == ref_low.shape, name
        print(
            f"\n[parity vit_b] {name} multimask={multimask}: low-res logits "
            f"{np.abs(low - ref_low).max():.2e}, scores {np.abs(s - ref_s).max():.2e}, "
            f"mask agreement {(m == ref_m).mean():.6f}"
        )
        assert np.abs(low - ref_low).max() <= 1e-3, name
        assert np.abs(s - ref_s).max() <= 1e-4, name
        assert (m == ref_m).mean() >= 0.9999, name
        # mask_input from the previous call, as an interactive loop feeds it back
        best = int(np.argmax(ref_s))
        ref2 = official.predict(mask_input=ref_low[best : best + 1], multimask_output=False, **kw)
        got2 = ours.predict(mask_input=low[best : best + 1], multimask_output=False, **kw)
        print(
            f"[parity vit_b] {name} + mask_input: low-res logits "
            f"{np.abs(got2[2] - ref2[2]).max():.2e}, scores {np.abs(got2[1] - ref2[1]).max():.2e}"
            f", mask agreement {(got2[0] == ref2[0]).mean():.6f}"
        )
        assert np.abs(got2[2] - ref2[2]).max() <= 1e-3, name
        assert np.abs(got2[1] - ref2[1]).max() <= 1e-4, name
        assert (got2[0] == ref2[0]).mean() >= 0.9999, name
