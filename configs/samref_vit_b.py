"""Accelerator recipe: SAM-REF on SAM ViT-B (1024 frame), frozen image encoder, COCO + LVIS.

The whole path on a pod (P hosts; host I runs every multi-host command with its own index; on
TPU pods ``--distributed`` finds the others, on GPU clusters give ``--coordinator HOST:PORT
--num_processes P --process_id I``; ``gs://B`` is any bucket or shared folder)::

    # 1. SAM weights -> a JAX checkpoint (once)
    samref convert --checkpoint sam_vit_b_01ec64.pth --output gs://B/checkpoints/vit_b
    # 2. COCO + LVIS records, one per image (every host: the shards j with j % P == I)
    samref prepare-coco --name coco_lvis --data-dir gs://B/tfds \
        --annotations gs://B/lvis/lvis_v1_train.json \
        --annotations gs://B/coco/annotations/instances_train2017.json \
        --images gs://B/coco/train2017 --num-shards 64 --process-index $I --process-count $P
    # 3. optional, frozen encoder: its embeddings of data.cached_views views per image (every host)
    samref cache-embeddings --config configs/samref_vit_b.py --distributed \
        --config.train.init_checkpoint=gs://B/checkpoints/vit_b \
        --config.data.data_dir=gs://B/tfds --config.data.cached_views=2
    # 4. train (every host; add --config.data.use_cached_embeddings=True
    #    --config.data.cached_views=2 to train on the cache of step 3)
    python -m train.main --config configs/samref_vit_b.py --workdir gs://B/runs/vit_b \
        --distributed --config.train.init_checkpoint=gs://B/checkpoints/vit_b \
        --config.data.data_dir=gs://B/tfds
    # 5. evaluate the exported model (one host)
    samref eval --checkpoint gs://B/runs/vit_b/export --dataset GrabCut --data-dir /data \
        --mode sam full --max-clicks 20 --output runs/grabcut_vit_b

``data.format = "coco"`` reads the records of step 2 (``data.name`` = its ``--name``); each
example is one instance of an image (at least ``data.coco.min_area`` = 1000 pixels; with
probability ``merge_prob`` = 0.15 a union of up to ``max_merged`` = 2 touching instances; COCO
crowd regions ignored in the losses), augmented as every dataset is. The folder datasets still
work: ``--config.data.format=folder --config.data.name=SBD
--config.data.manual_dir=/data/SBD/dataset``. The run trains the SAM mask decoder and both
refiners end to end over ``train.rounds`` = 6 unrolled clicks on a ('data',) mesh of every
device (``per_device_batch_size`` x devices images per step), AdamW with warmup and cosine
decay, bf16 compute (SAM and both refiners; float32 parameters), and writes checkpoints,
metrics.jsonl, eval.jsonl, curves.png and the exported model ``WORKDIR/export``
(``SamRefPredictor.from_checkpoint``). Not run at this size here: each command is tested at
small size (docs/training.md, 'COCO + LVIS at scale'); the settings follow the SAM-REF/RITM
lineage and are untuned.
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
    # Half the frame would make the click rounds 1.7x cheaper (114 vs 194 GFLOP per image) but
    # cost 1.1 clicks of NoC@90 at the bundled models' size (results/globaldiff_working_size).
    config.model.refiners.global_diff.input_size = None
    # PatchDiff crops its image patch from a 2048 copy of the image (image_scale 2), resized
    # from the original: detail the 1024 frame loses on large photos reaches the refiner (on
    # images no larger than the frame, e.g. most of COCO, the copy holds no more than the frame).
    config.model.refiners.patch_diff.image_scale = 2

    d = config.data
    d.format = "coco"  # `samref prepare-coco --name coco_lvis` (LVIS v1 + COCO 2017 train)
    d.name = "coco_lvis"
    d.split = "train"
    d.coco.min_area = 1000.0  # RITM's COCO+LVIS setting (it filters after augmenting)
    d.coco.merge_prob = 0.15
    d.coco.max_merged = 2
    # 4 images take 6.2 GiB of step memory (1.44 GiB each with train.remat; `python
    # benchmarks/train_step.py --parts memory --batch 4 16`); larger devices hold more (the
    # global batch, and so the learning rate's fit, change with it).
    d.per_device_batch_size = 4
    d.heldout_every = 0  # evaluate on a separate benchmark (samref eval) instead
    # Host cost per example (benchmarks/input_pipeline.py): about 0.11 core-seconds, so feed each
    # accelerator from images/s x 0.11 cores (cached views: 0.03 core-seconds each).
    # An example is about 17 MB (with PatchDiff's 2048 image): each worker makes 2 batches at
    # a time, 2 ahead.
    d.num_workers = 8
    d.read_threads, d.prefetch_batches = 2, 2
    d.scale_min, d.scale_max = 0.75, 1.4

    t = config.train
    t.trainable = ("sam/mask_decoder", "global_diff", "patch_diff")  # encoder frozen
    t.init_checkpoint = ""  # converted SAM weights (required): --config.train.init_checkpoint
    t.init_subtrees = ("sam",)  # SAM from it, fresh refiners (they start at SAM's answer)
    t.rounds = 6
    t.stop_grad_feedback = False
    # Each round recomputed in the backward pass: about half the memory at T = 2 and a faster
    # step on a CPU at 1024 (docs/benchmarks.md, 'train_step.py'); T = 6 x batch 4 at 1024
    # without it keeps every round's full-frame activations.
    t.remat = True
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
