"""CPU recipe: a small SAM-shaped SAM-REF trained FROM SCRATCH on COCO_MVal (128 frame).

Everything trains (encoder, prompt encoder, decoder, both refiners), end to end over
``train.rounds`` unrolled click rounds. ``mode`` picks the model: "full" (SAM + GlobalDiff +
PatchDiff) or "sam" (the baseline: refiners off and frozen, SAM trained the same way).

Stage 1 of the bundled models (the paper's two-stage recipe; docs/training.md): the tiny SAM
alone, from scratch, in two legs on the 2-core machine -- this config in "sam" mode for 36
minutes, then ``configs/tiny_sam_control.py`` continuing it for 50 more::

    python -m train.main --config configs/tiny_cpu.py --workdir runs/tiny_sam --config.mode=sam
    python -m train.main --config configs/tiny_sam_control.py --workdir runs/stage1 \
        --config.train.init_checkpoint=runs/tiny_sam/export --config.train.max_minutes=50

Stage 2 (``configs/tiny_refine.py``) and its control (``configs/tiny_sam_control.py``) both
start from ``runs/stage1/export``.

``data.manual_dir`` defaults to ``$SAMREF_DATA_DIR/COCO_MVal``. Each run writes
``WORKDIR/{checkpoints,metrics.jsonl,eval.jsonl,curves.png}`` and the exported model
``WORKDIR/export`` (loadable with ``SamRefPredictor.from_checkpoint(WORKDIR/"export")``;
< 20 MB). A second call with the same ``--workdir`` resumes.
"""

from __future__ import annotations

import ml_collections

from samref_jax.training.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config("tiny")
    config.mode = "full"
    config.seed = 0
    m = config.model
    # A slightly wider/deeper tiny SAM than the test model (trains better, still < 2 MB).
    m.sam_overrides = dict(
        encoder_embed_dim=96,
        encoder_depth=4,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(1, 3),
        prompt_embed_dim=64,
        decoder_num_heads=4,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
        mask_in_chans=16,
    )
    # From scratch, SAM's 3 multimask outputs would train unevenly; use the single-mask token.
    m.multimask_first_click = False
    m.max_clicks = 24
    # Depthwise convolutions are slow on CPU: GlobalDiff works on a 64 square (32x32 features)
    # and PatchDiff on a 48 patch, one block before and one after the embedding fusion each.
    for r in (m.refiners.global_diff, m.refiners.patch_diff):
        r.width = 32
        r.blocks_before = 1
        r.blocks_after = 1
    m.refiners.global_diff.input_size = 64
    m.refiners.patch_diff.patch_size = 48

    d = config.data
    d.name = "COCO_MVal"
    d.split = "test"
    d.per_device_batch_size = 4
    d.heldout_every = 50  # instance i is held out (periodic eval) iff i % 50 == 0 -> 16 held out
    d.num_workers = 0
    # COCO objects are small at a 128 frame (median 8% of the area): from scratch, SAM then
    # collapses to "all background". Zoom in so the object's box spans 35-90% of the frame.
    d.zoom_in = (0.35, 0.9)

    t = config.train
    t.trainable = ("sam", "global_diff", "patch_diff")  # everything, from scratch
    t.rounds = 3
    t.num_steps = 20000  # the schedule's horizon; the wall-clock budget stops the run earlier
    t.max_minutes = 36.0
    t.lr = 1e-3
    t.warmup_steps = 100
    t.end_lr_factor = 0.05
    t.weight_decay = 1e-4
    t.clip_norm = 1.0
    t.log_every = 10
    t.checkpoint_every_steps = 250
    t.keep_checkpoints = 2

    config.loss.round_weights = (1.0, 1.0, 1.0)
    config.loss.seg = "bce_dice"  # Dice keeps a from-scratch model off the empty mask

    e = config.eval
    e.every_steps = 1000  # periodic evaluation time is not counted in max_minutes
    e.num_samples = 16
    e.max_clicks = 10
    return config
