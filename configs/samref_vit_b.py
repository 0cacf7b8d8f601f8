"""Accelerator recipe: SAM-REF on SAM ViT-B (1024 frame), frozen image encoder.

Command (one host; on a multi-host TPU pod add ``--distributed``, or
``--coordinator HOST:PORT --num_processes N --process_id I`` on GPU clusters)::

    samref convert --checkpoint sam_vit_b_01ec64.pth --output checkpoints/vit_b   # SAM weights
    samref train --config configs/samref_vit_b.py --workdir runs/vit_b \\
        --config.train.init_checkpoint=checkpoints/vit_b \\
        --config.data.name=SBD --config.data.manual_dir=/data/SBD/dataset \\
        --config.data.data_dir=/data/tfds

It prepares the TFDS/ArrayRecord copy of ``data.name`` once (any builder of
``samref_jax.data``: SBD, PascalVOC, COCO_MVal, ...), then trains the SAM mask decoder and both
refiners end to end over ``train.rounds`` = 6 unrolled clicks on a ('data',) mesh of every
device (``per_device_batch_size`` x devices images per step), AdamW with warmup and cosine
decay, bf16 compute (SAM and both refiners; float32 parameters), and writes checkpoints,
metrics.jsonl, eval.jsonl, curves.png and the exported model ``WORKDIR/export``
(``SamRefPredictor.from_checkpoint``). Not run here (no accelerator in this environment): the
settings follow the SAM-REF/RITM lineage and are untuned.
"""

from __future__ import annotations

import ml_collections

from samref_jax.training.config import base_config


def get_config(sam_type: str = "vit_b") -> ml_collections.ConfigDict:
    config = base_config(sam_type)
    config.mode = "full"
    config.seed = 0
    config.model.multimask_first_click = True
    config.model.max_clicks = 24
    config.model.feedback = "refined"  # refined logits feed SAM's next mask input
    # GlobalDiff on the whole 1024 frame: its stem grid and heads are 512 x 512, twice SAM's
    # 256 x 256 low-res logits (the CPU interactive default works on a 256 square instead).
    config.model.refiners.global_diff.input_size = None

    d = config.data
    d.name = "SBD"
    d.split = "train"
    d.per_device_batch_size = 4
    d.heldout_every = 0  # evaluate on a separate benchmark (samref eval) instead
    d.num_workers = 8
    d.scale_min, d.scale_max = 0.75, 1.4

    t = config.train
    t.trainable = ("sam/mask_decoder", "global_diff", "patch_diff")  # encoder frozen
    t.init_checkpoint = ""  # converted SAM weights (required): --config.train.init_checkpoint
    t.init_subtrees = ("sam",)  # SAM from it, fresh refiners (they start at SAM's answer)
    t.rounds = 6
    t.stop_grad_feedback = False
    t.num_steps = 60000
    t.max_minutes = 0.0
    t.lr = 1e-4
    t.warmup_steps = 1000
    t.end_lr_factor = 0.01
    t.weight_decay = 0.05
    t.clip_norm = 1.0
    t.dtype = "bfloat16"
    t.log_every = 50
    t.checkpoint_every_steps = 2000
    t.keep_checkpoints = 3

    config.loss.sam_weight = 0.5
    config.loss.round_weights = (1.0,)  # every round counts the same

    config.eval.every_steps = 0
    return config
