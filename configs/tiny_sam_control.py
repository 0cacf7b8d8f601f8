"""The equal-compute SAM-only control of stage 2 (the bundled ``tiny-sam``).

Starts from the stage-1 export with every SAM parameter trainable, for the same wall-clock
budget and data as ``configs/tiny_refine.py`` (``train.max_minutes=40``, copy-paste on; the two
run at the same time on the 2-core machine), so that ``tiny`` is compared with SAM given the
same extra compute. The later legs of stage 1 are this config too (without copy-paste, 50 and
30 minutes; docs/training.md). Command::

    python -m train.main --config configs/tiny_sam_control.py --workdir runs/tiny_control \
        --config.train.init_checkpoint=runs/stage1/export

Result (all 50 GrabCut images, 20 clicks, ``sam`` mode): NoC@85 12.90, NoC@90 17.16, 5-mIoU
75.73% (``results/tiny_grabcut/``); its 16000-step schedule ended after 31 minutes.
"""

from __future__ import annotations

import ml_collections

from configs import tiny_cpu


def get_config() -> ml_collections.ConfigDict:
    config = tiny_cpu.get_config()
    config.mode = "sam"
    # The stage-1 checkpoint's (untrained) refiner design, so the export loads in any mode.
    config.model.feedback = "sam"
    for r in (config.model.refiners.global_diff, config.model.refiners.patch_diff):
        r.detail_residual = False
        r.prev_mask_input = False
    t = config.train
    t.init_checkpoint = "runs/stage1/export"
    config.data.copy_paste_prob = 0.3  # the same data as stage 2
    t.trainable = ("sam",)
    t.rounds = 3
    t.num_steps = 16000  # the schedule horizon; the wall-clock budget stops the run earlier
    t.max_minutes = 40.0
    t.lr = 1e-3
    t.warmup_steps = 100
    t.checkpoint_every_steps = 500
    config.loss.round_weights = (1.0,)
    config.eval.every_steps = 1000
    return config
