"""The equal-compute SAM-only control of stage 2 (the bundled ``tiny-sam``).

Starts from the stage-1 export (``configs/tiny_cpu.py``) with every SAM parameter trainable,
for the same wall-clock budget as ``configs/tiny_refine.py`` (``train.max_minutes=30``; the two
run at the same time on the 2-core machine), so that ``tiny`` is compared with SAM given the
same extra compute. The second leg of stage 1 is this config too, with
``--config.train.max_minutes=50``. Command::

    python -m train.main --config configs/tiny_sam_control.py --workdir runs/tiny_control \
        --config.train.init_checkpoint=runs/stage1/export
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
    t.init_checkpoint = "runs/tiny_sam/export"
    t.trainable = ("sam",)
    t.rounds = 3
    t.num_steps = 12000
    t.max_minutes = 30.0
    t.lr = 1e-3
    t.warmup_steps = 100
    t.checkpoint_every_steps = 500
    config.loss.round_weights = (1.0,)
    config.eval.every_steps = 1000
    return config
