"""Converter: strict mapping, vit_l/vit_h shapes from meta-device builds, every error case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from samref_jax.sam import count_params, sam_config
from samref_jax.sam.convert import (
    ConversionError,
    convert_state_dict,
    expected_shapes,
    flax_path,
    main,
)
from tests.sam_reference import build_torch_sam, random_torch_sam, state_dict_numpy, torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name,n_params,n_keys",
    [("vit_b", 93_735_728, 314), ("vit_l", 312_343_088, 482), ("vit_h", 641_090_864, 594)],
)
def test_official_mapping_shapes(name, n_params, n_keys):
    """The official model built on the meta device (allocates nothing) maps onto our tree."""
    cfg = sam_config(name)
    with torch.device("meta"):
        ts = build_torch_sam(cfg)
    sd = ts.state_dict()
    assert len(sd) == n_keys
    shapes = expected_shapes(cfg)
    assert sum(int(np.prod(s)) for s in shapes.values()) == n_params
    used = {}
    for key, t in sd.items():
        path = flax_path(key)
        if path not in shapes:
            path = path[:-1] + ("scale",)
        assert path in shapes, key
        assert path not in used, (key, used.get(path))
        used[path] = key
        # Layout change gives the Flax shape.
        shape = tuple(t.shape)
        if path[-1] == "kernel" and len(shape) == 2:
            shape = shape[::-1]
        elif path[-1] == "kernel" and len(shape) == 4:
            order = (2, 3, 0, 1) if "output_upscaling" in key else (2, 3, 1, 0)
            shape = tuple(shape[i] for i in order)
        assert shape == shapes[path], key
    assert set(used) == set(shapes)


@pytest.mark.slow
def test_vit_b_param_count_matches_torch():
    """Ours counts the Fourier buffer too: torch parameters() + 256 = 93,735,472 + 256."""
    cfg = sam_config("vit_b")
    with torch.device("meta"):
        ts = build_torch_sam(cfg)
    n_torch = sum(p.numel() for p in ts.parameters())
    assert n_torch == 93_735_472
    shapes = jax.eval_shape(
        lambda: __import__("samref_jax.sam", fromlist=["Sam"]).Sam(cfg).init(jax.random.key(0))
    )["params"]
    assert count_params(shapes) == n_torch + 256


@pytest.fixture(scope="module")
def tiny_sd():
    return state_dict_numpy(random_torch_sam(sam_config("tiny"), seed=5))


def test_strict_unexpected_and_missing(tiny_sd):
    cfg = sam_config("tiny")
    convert_state_dict(tiny_sd, config=cfg)  # the complete dict converts
    extra = dict(tiny_sd, **{"mask_decoder.extra.weight": np.zeros(3)})
    with pytest.raises(ConversionError, match="unexpected key.*mask_decoder.extra.weight"):
        convert_state_dict(extra, config=cfg)
    missing = {k: v for k, v in tiny_sd.items() if k != "mask_decoder.iou_token.weight"}
    with pytest.raises(ConversionError, match="missing parameter.*iou_token"):
        convert_state_dict(missing, config=cfg)
    bad = dict(tiny_sd)
    bad["image_encoder.pos_embed"] = np.zeros((1, 4, 4, 64), np.float32)
    with pytest.raises(ConversionError, match="shape mismatch.*pos_embed"):
        convert_state_dict(bad, config=cfg)


def test_detects_not_sam_and_wrong_type(tiny_sd):
    with pytest.raises(ConversionError, match="not a SAM checkpoint"):
        convert_state_dict({"fc.weight": np.zeros((2, 2))})
    with pytest.raises(ConversionError, match="not an official SAM v1"):
        convert_state_dict(tiny_sd)  # width 64 is no official type
    fake_b = {"image_encoder.patch_embed.proj.weight": np.zeros((768, 3, 16, 16), np.float32)}
    with pytest.raises(ConversionError, match="--model-type vit_h does not match.*vit_b"):
        convert_state_dict(fake_b, model_type="vit_h")


def _run_cli(*args):
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert_weights.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(rc, err, pattern):
    assert rc == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and pytest.importorskip("re").search(pattern, lines[0]), err


@pytest.mark.slow
def test_cli_error_cases(tmp_path):
    out = tmp_path / "out"
    rc, _, err = _run_cli("--checkpoint", tmp_path / "nope.pth", "--output", out)
    _one_line_error(rc, err, "does not exist")

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a torch file at all" * 10)
    rc, _, err = _run_cli("--checkpoint", junk, "--output", out)
    _one_line_error(rc, err, "not a readable PyTorch checkpoint")

    sd = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
        "mask_decoder.iou_token.weight": torch.zeros(1, 256),
    }
    good = tmp_path / "partial.pth"
    torch.save(sd, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    rc, _, err = _run_cli("--checkpoint", truncated, "--output", out)
    _one_line_error(rc, err, "not a readable PyTorch checkpoint")

    rc, _, err = _run_cli("--checkpoint", good, "--output", out)
    _one_line_error(rc, err, "does not match SAM vit_b.*missing parameter")

    notsam = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, notsam)
    rc, _, err = _run_cli("--checkpoint", notsam, "--output", out)
    _one_line_error(rc, err, "not a SAM checkpoint.*conv1.weight")

    rc, _, err = _run_cli("--checkpoint", good, "--output", out, "--model-type", "vit_l")
    _one_line_error(rc, err, "--model-type vit_l does not match")

    pickled = tmp_path / "pickled.pth"
    # A pickle that would call os.system("true"): weights_only=True must refuse to run it.
    pickled.write_bytes(
        b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c"
        b"\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94."
    )
    rc, _, err = _run_cli("--checkpoint", pickled, "--output", out)
    _one_line_error(rc, err, "was refused: it holds pickle instructions other than plain")
    assert "weights_only" not in err
    assert not out.exists()


def test_main_in_process_roundtrip(tmp_path, tiny_sd, monkeypatch):
    """main() on a full official-layout dict writes a checkpoint that load_sam reads back."""
    from samref_jax.sam import convert as conv
    from samref_jax.sam.build import load_sam

    pth = tmp_path / "tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in tiny_sd.items()}, pth)
    cfg = sam_config("tiny")
    orig = conv.convert_state_dict
    monkeypatch.setattr(conv, "convert_state_dict", lambda sd, mt=None: orig(sd, config=cfg))
    monkeypatch.setattr(conv, "sam_config", lambda name: cfg)
    assert main(["--checkpoint", str(pth), "--output", str(tmp_path / "ck")]) == 0
    model = load_sam(tmp_path / "ck")
    assert model.config == cfg
    np.testing.assert_array_equal(
        np.asarray(model.params["mask_decoder"]["iou_token"]),
        tiny_sd["mask_decoder.iou_token.weight"],
    )
