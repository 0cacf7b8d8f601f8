"""Accelerator recipe: SAM-REF on SAM ViT-H (1024 frame), frozen image encoder.

Command (as ``samref_vit_b.py``, with ViT-H weights)::

    samref convert --checkpoint sam_vit_h_4b8939.pth --output checkpoints/vit_h
    samref train --config configs/samref_vit_h.py --workdir runs/vit_h \\
        --config.train.init_checkpoint=checkpoints/vit_h \\
        --config.data.name=SBD --config.data.manual_dir=/data/SBD/dataset \\
        --config.data.data_dir=/data/tfds

Same recipe as ViT-B with a smaller per-device batch (the frozen ViT-H encoder runs inside the
step under ``stop_gradient``; its activations are not kept for the backward pass) and a lower
learning rate. Not run here (no accelerator in this environment).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def _vit_b():
    # Config files are loaded by path (not as a package): load the sibling the same way.
    spec = importlib.util.spec_from_file_location(
        "samref_vit_b", Path(__file__).with_name("samref_vit_b.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config() -> ml_collections.ConfigDict:
    config = _vit_b().get_config("vit_h")
    config.data.per_device_batch_size = 2
    config.train.lr = 5e-5
    return config
