"""Accelerator recipe: SAM-REF on SAM ViT-H (1024 frame), frozen image encoder, COCO + LVIS.

The same path as ``samref_vit_b.py`` (convert, prepare-coco, optional cache-embeddings, train,
eval), with ViT-H weights; the COCO + LVIS records of step 2 serve both recipes::

    samref convert --checkpoint sam_vit_h_4b8939.pth --output gs://B/checkpoints/vit_h
    samref prepare-coco --name coco_lvis --data-dir gs://B/tfds \
        --annotations gs://B/lvis/lvis_v1_train.json \
        --annotations gs://B/coco/annotations/instances_train2017.json \
        --images gs://B/coco/train2017 --num-shards 64 --process-index $I --process-count $P
    samref cache-embeddings --config configs/samref_vit_h.py --distributed \
        --config.train.init_checkpoint=gs://B/checkpoints/vit_h \
        --config.data.data_dir=gs://B/tfds --config.data.cached_views=2   # optional
    python -m train.main --config configs/samref_vit_h.py --workdir gs://B/runs/vit_h \
        --distributed --config.train.init_checkpoint=gs://B/checkpoints/vit_h \
        --config.data.data_dir=gs://B/tfds
    samref eval --checkpoint gs://B/runs/vit_h/export --dataset GrabCut --data-dir /data \
        --mode sam full --max-clicks 20 --output runs/grabcut_vit_h

Same recipe as ViT-B with a smaller per-device batch (the frozen ViT-H encoder runs inside the
step under ``stop_gradient``; its activations are not kept for the backward pass) and a lower
learning rate. The step at 2 images per device takes 5.6 GiB (``python
benchmarks/train_step.py --sam vit_h --parts memory --batch 2``: XLA's buffer assignment on a
CPU; each further image about 1.45 GiB), so larger devices hold more. Not run at this size
here.
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
