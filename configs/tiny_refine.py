"""Stage 2 on CPU: GlobalDiff + PatchDiff trained on a stage-1 tiny SAM (the bundled ``tiny``).

The paper's two-stage recipe at CPU size. Stage 1 trains the tiny SAM alone from scratch
(``configs/tiny_cpu.py``, continued by ``configs/tiny_sam_control.py``; its export
``runs/stage1/export``, docs/training.md). Stage 2 (this file) keeps SAM's
image encoder frozen, takes SAM from the stage-1 export (``train.init_subtrees=("sam",)``),
starts both refiners fresh (untrained refiners return SAM's logits exactly, so the run starts
from SAM's answer) and trains them with SAM's prompt encoder and mask decoder, end to end
through ``train.rounds`` click rounds: the refined logits of a round are the refiners'
previous-mask input of the next and are added to SAM's next ``mask_input``
(``model.feedback="refined"``), both differentiably.

Budget: ``train.max_minutes=40`` on the 2-core CPU machine (periodic evaluation not counted),
run at the same time as its equal-compute control ``configs/tiny_sam_control.py``::

    python -m train.main --config configs/tiny_refine.py --workdir runs/tiny_refine \
        --config.train.init_checkpoint=runs/stage1/export
    python -m train.main --config configs/tiny_sam_control.py --workdir runs/tiny_control \
        --config.train.init_checkpoint=runs/stage1/export

``data.manual_dir`` defaults to ``$SAMREF_DATA_DIR/COCO_MVal``. ``runs/tiny_refine/export`` is
the bundled ``tiny``; GrabCut results and the commands that made them: docs/evaluation.md.

Resolution (frame 128, SAM's low-res logits 32 x 32): GlobalDiff works on a 64 square (stem
grid 32 x 32; on the whole frame the step costs 3x more on this CPU); PatchDiff refines a
48 x 48 patch of the window it selects, cropped from a copy of the image at 256 (twice the
frame, ``image_scale=2``). Copy-paste augmentation on (``data.copy_paste_prob=0.3``).

Result (all 50 GrabCut images, 20 clicks): NoC@85 10.40, NoC@90 14.38, 5-mIoU 79.18% against
the control's 12.90, 17.16, 75.73% (``results/tiny_grabcut/``).
"""

from __future__ import annotations

import ml_collections

from configs import tiny_cpu


def get_config() -> ml_collections.ConfigDict:
    config = tiny_cpu.get_config()
    config.mode = "full"
    m = config.model
    m.feedback = "refined"
    for r in (m.refiners.global_diff, m.refiners.patch_diff):
        r.detail_residual = True
        r.prev_mask_input = True
    m.refiners.global_diff.input_size = 64  # stem grid 32 x 32 (3x cheaper than the 128 frame)
    m.refiners.patch_diff.image_scale = 2  # PatchDiff crops from the image at 256, not the frame
    config.data.copy_paste_prob = 0.3

    t = config.train
    t.init_checkpoint = "runs/stage1/export"
    t.init_subtrees = ("sam",)
    t.trainable = ("sam/prompt_encoder", "sam/mask_decoder", "global_diff", "patch_diff")
    t.rounds = 3
    t.num_steps = 6000  # the schedule's horizon; the wall-clock budget stops the run earlier
    t.max_minutes = 40.0
    t.lr = 1e-3
    t.warmup_steps = 100
    t.checkpoint_every_steps = 200
    config.loss.round_weights = (1.0,)
    config.eval.every_steps = 500
    return config
