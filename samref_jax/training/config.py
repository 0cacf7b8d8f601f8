"""Shared defaults of the training configs (``configs/*.py`` start from :func:`base_config`).

Fields:
  mode: "full" | "global" | "sam" -- how far the click path runs (and which losses apply).
  seed: data order, augmentation and initialisation.
  model: ``samref_model_config`` (sam_type, sam_overrides, refiners, click radius, max_clicks).
  data: name (TFDS builder / folder layout), manual_dir (upstream folder; default
    ``$SAMREF_DATA_DIR/<name>``), data_dir (prepared TFDS/ArrayRecord; default
    ``WORKDIR/../tfds``), split, per_device_batch_size, heldout_every (instances with
    index % heldout_every == 0 are held out for periodic eval; 0: none), num_workers (Grain
    worker processes; 0 = in process), read_threads and prefetch_batches (Grain's threads and
    its buffer of batches made ahead, per process: memory up to prefetch_batches x the
    process's batch), augmentation (scale_min, scale_max, flip, jitter,
    min_object_pixels, zoom_in), copy_paste_prob, copy_paste_scale, copy_paste_distractor_prob,
    copy_paste_max_cover (the object pasted onto another record, ``pipeline.copy_paste``),
    first_click_frac (first click drawn uniformly among the object pixels whose distance to the
    background is >= frac * max: 0.5 in every config; 1.0 = the centre); use_cached_embeddings,
    cached_views, cache_dtype, cache_dir (training on cached frozen-encoder embeddings,
    ``samref_jax.training.embedding_cache``);
    format ("folder" | "coco") and coco (COCO-format data, ``samref_jax.data.coco``: annotations,
    images, dedup_iou, num_shards for preparing it; min_area, merge_prob, max_merged for the
    instance drawn per example).
  train: trainable (path prefixes), rounds (T), num_steps, max_minutes (wall clock; 0 = none;
    checked before every step, with several processes before every log_every-th), lr,
    warmup_steps, end_lr_factor, b1, b2, weight_decay, clip_norm, dtype ("float32" |
    "bfloat16"), stop_grad_feedback, remat (recompute each round in the backward pass),
    remat_policy (what remat keeps: a ``jax.checkpoint_policies`` name), init_checkpoint,
    log_every, checkpoint_every_steps, keep_checkpoints.
  loss: see ``samref_jax.training.losses.default_loss_config``.
  eval: every_steps, num_samples, max_clicks (periodic held-out eval; 0 steps = off).
"""

from __future__ import annotations

import ml_collections

from samref_jax.samref.config import samref_model_config
from samref_jax.training.losses import default_loss_config


def base_config(sam_type: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "full"
    c.seed = 0
    c.model = samref_model_config(sam_type)
    c.data = ml_collections.ConfigDict(
        dict(
            name="COCO_MVal",
            manual_dir="",
            data_dir="",
            split="",
            per_device_batch_size=2,
            heldout_every=0,
            num_workers=0,
            read_threads=16,  # Grain's default
            prefetch_batches=16,  # Grain's default is 500 batches: unbounded at 1024
            scale_min=0.75,
            scale_max=1.4,
            zoom_in=(),  # e.g. (0.3, 0.9): object-centric zoom (box side / frame); () = off
            flip=True,
            jitter=0.2,
            min_object_pixels=16,
            # Copy-paste (pipeline.copy_paste): the object onto another record's image
            copy_paste_prob=0.0,  # probability per example; 0 = off
            copy_paste_scale=(0.75, 1.25),  # the pasted object's extra scale, U(lo, hi)
            copy_paste_distractor_prob=0.5,  # then also another record's object over it
            copy_paste_max_cover=0.3,  # the distractor covers at most this of the object
            first_click_frac=0.5,
            # Frozen encoder: train on cached views (python -m samref_jax.training.cache_embeddings)
            use_cached_embeddings=False,
            cached_views=8,  # augmented views cached per instance
            cache_dtype="bfloat16",  # embedding storage: "float32" | "bfloat16"
            cache_dir="",  # "" = <data_dir>/embeddings/<builder>/<split>-<fingerprint>
            # "folder": a benchmark folder (name = its layout); "coco": COCO-format instance
            # data prepared by `samref prepare-coco` (name = its --name), one record per image
            format="folder",
            coco=ml_collections.ConfigDict(
                dict(
                    annotations=(),  # JSON files (LVIS first): prepare on first use if set
                    images=(),  # image folders for them
                    dedup_iou=0.8,  # a later file's instance with this IoU is a duplicate
                    num_shards=1,  # shards when the trainer prepares the data itself
                    min_area=1000.0,  # instances below (original pixels) are never sampled
                    merge_prob=0.15,  # probability that the object is a union of instances
                    max_merged=2,  # at most this many touching instances in the union
                )
            ),
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            trainable=("sam/mask_decoder", "global_diff", "patch_diff"),
            rounds=3,
            num_steps=1000,
            max_minutes=0.0,
            lr=1e-4,
            warmup_steps=100,
            end_lr_factor=0.01,
            b1=0.9,
            b2=0.999,
            weight_decay=0.05,
            clip_norm=1.0,
            dtype="float32",
            stop_grad_feedback=False,
            # Recompute each round's forward in the backward pass instead of keeping its
            # activations (jax.checkpoint on the round): peak memory of one round instead of T,
            # for about one more forward per round.
            remat=False,
            # What train.remat keeps of each round: a name in jax.checkpoint_policies
            # ("nothing_saveable": recompute everything; "dots_saveable": keep the outputs of
            # matrix products and convolutions, recompute the rest).
            remat_policy="nothing_saveable",
            init_checkpoint="",
            init_subtrees=(),  # () all of init_checkpoint; ("sam",): SAM only, fresh refiners
            log_every=10,
            checkpoint_every_steps=500,
            keep_checkpoints=3,
        )
    )
    c.loss = default_loss_config()
    c.eval = ml_collections.ConfigDict(dict(every_steps=0, num_samples=16, max_clicks=10))
    return c
