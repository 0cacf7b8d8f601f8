"""The training step: one jit-compiled, data-parallel step that unrolls T click rounds.

Layout: a 1-D ``('data',)`` mesh over all devices (of all processes); the ``TrainState`` is
replicated, the batch is sharded along its leading axis. The step is ``jax.jit`` with explicit
``NamedSharding``s, so gradients and metrics (means over the global batch) are reduced across
devices by XLA's collectives -- the SPMD equivalent of ``shard_map`` + ``lax.pmean``
(docs/design.md, 'Training step').

Inside the step (:func:`unrolled_loss`):

1. ``E = embed_image(image)`` (under ``stop_gradient`` when the encoder is not trainable);
2. ``lax.scan`` over T rounds: ``SamRef.click`` -> per-round losses (``losses.round_losses``)
   -> the next click from :func:`next_click_jax` on the round's final mask vs GT (discrete, no
   gradient) -> SAM's next mask input and the final logits are fed back by the model's one
   feedback rule (``samref.feedback_inputs``; ``model.feedback``), differentiably unless
   ``train.stop_grad_feedback``: the refined mask of round t is an input of round t + 1.

Trainable subtrees (``train.trainable``, '/'-joined path prefixes such as ``"sam/mask_decoder"``
or ``"global_diff"``) get AdamW (warmup + cosine, global-norm clipping); every other leaf goes
through ``optax.set_to_zero`` and therefore gets exactly zero updates.

Example:
  >>> mesh = make_mesh()                                                      # doctest: +SKIP
  >>> params = init_params(config, jax.random.key(0))                         # doctest: +SKIP
  >>> state = put_replicated(create_state(config, params, 0), mesh)           # doctest: +SKIP
  >>> step_fn = make_train_step(config, mesh, params)                         # doctest: +SKIP
  >>> state, metrics = step_fn(state, shard_batch(batch, mesh))               # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from samref_jax.interaction.clicker import next_click_jax
from samref_jax.samref.config import sam_config_from
from samref_jax.samref.model import ClickInputs, SamRef, feedback_inputs, init_samref_params
from samref_jax.training import losses as L

Array = jax.Array

# Incremented every time the step function is traced (tests assert one trace per run).
TRACE_COUNT = {"train_step": 0}


class TrainState(NamedTuple):
    """step: int32[]; params: the SamRef tree; opt_state: optax state; rng: uint32[2] key data."""

    step: Array
    params: Any
    opt_state: Any
    rng: Array


# ---------------------------------------------------------------------------- optimiser


def param_labels(params: Any, trainable: Any) -> Any:
    """Tree of "train" / "frozen" labels: a leaf trains iff its '/'-joined path starts with one
    of the ``trainable`` prefixes."""
    prefixes = tuple(str(p).strip("/") for p in trainable)

    def label(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        ok = any(name == p or name.startswith(p + "/") for p in prefixes)
        return "train" if ok else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def effective_trainable(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``train.trainable`` minus the refiners in "sam" mode (unused there, so frozen)."""
    t = tuple(config.train.trainable)
    if config.mode == "sam":
        t = tuple(p for p in t if not p.startswith(("global_diff", "patch_diff")))
    elif config.mode == "global":
        t = tuple(p for p in t if not p.startswith("patch_diff"))
    return t


def learning_rate_schedule(tc: Any) -> optax.Schedule:
    """Linear warmup to ``lr`` then cosine decay to ``lr * end_lr_factor`` at ``num_steps``."""
    warm = max(int(tc.warmup_steps), 1)
    total = max(int(tc.num_steps), warm + 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, float(tc.lr), warm, total, end_value=float(tc.lr) * float(tc.end_lr_factor)
    )


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """Clip by global norm -> AdamW(schedule) on trainable leaves; ``set_to_zero`` elsewhere."""
    tc = config.train
    decay_mask = jax.tree_util.tree_map(lambda x: np.ndim(x) >= 2, params)
    train_tx = optax.chain(
        optax.clip_by_global_norm(float(tc.clip_norm)),
        optax.adamw(
            learning_rate_schedule(tc),
            b1=float(tc.b1),
            b2=float(tc.b2),
            weight_decay=float(tc.weight_decay),
            mask=decay_mask,
        ),
    )
    labels = param_labels(params, effective_trainable(config))
    return optax.multi_transform({"train": train_tx, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------------- model


def model_of(config: ml_collections.ConfigDict) -> SamRef:
    dtype = jnp.bfloat16 if config.train.dtype == "bfloat16" else jnp.float32
    return SamRef(ml_collections.FrozenConfigDict(config.model), dtype)


def init_params(config: ml_collections.ConfigDict, rng: Array) -> Any:
    """Random params, or ``train.init_checkpoint`` (SAM or SAM-REF checkpoint) when set; with
    ``train.init_subtrees=("sam",)`` only SAM comes from the checkpoint and the refiners start
    fresh."""
    if config.train.get("init_checkpoint"):
        from samref_jax.samref.io import load_samref

        params, _, _ = load_samref(config.train.init_checkpoint, rng)
        if tuple(config.train.get("init_subtrees", ())) == ("sam",):
            # A refiner stage on a trained SAM: SAM from the checkpoint, fresh refiners (which
            # start at SAM's answer), whatever refiner design the checkpoint had.
            return init_samref_params(config.model, rng, sam_params=params["sam"])
        return params
    return init_samref_params(config.model, rng)


def create_state(config: ml_collections.ConfigDict, params: Any, seed: int) -> TrainState:
    tx = make_optimizer(config, params)
    rng = jax.random.key_data(jax.random.key(int(seed), impl="rbg")).astype(jnp.uint32)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)


# ---------------------------------------------------------------------------- the unroll


def preprocess_frame(image: Array, valid_hw: Array, sam_cfg: Any) -> Array:
    """uint8 (B, F, F, 3) padded frame -> normalised, zero outside the valid (h, w) area
    (what ``normalize_and_pad`` does for the predictor)."""
    mean = jnp.asarray(sam_cfg.pixel_mean, jnp.float32)
    std = jnp.asarray(sam_cfg.pixel_std, jnp.float32)
    x = (image.astype(jnp.float32) - mean) / std
    return x * valid_mask(valid_hw, image.shape[1:3])[..., None]


def valid_mask(valid_hw: Array, hw: tuple[int, int]) -> Array:
    rows = jnp.arange(hw[0])[None, :, None] < valid_hw[:, 0, None, None]
    cols = jnp.arange(hw[1])[None, None, :] < valid_hw[:, 1, None, None]
    return rows & cols


def unrolled_loss(
    params: Any,
    batch: dict[str, Array],
    model: SamRef,
    config: ml_collections.ConfigDict,
    round_weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Mean (over the batch) weighted loss of T unrolled rounds, and per-round metrics.

    ``batch``: image uint8 (B, F, F, 3); gt int8 (B, F, F) (1/0/-1, -1 also on padding);
    valid_hw int32 (B, 2); first_click int32 (B, 2) (y, x); radius float32 (B,).
    ``round_weights`` (T,) overrides ``loss.round_weights`` (a traced value: tests vary it).
    """
    mode = str(config.mode)
    T = int(config.train.rounds)
    lc = config.loss
    sam_cfg = sam_config_from(config.model)
    n_slots = int(config.model.max_clicks)
    f = sam_cfg.img_size
    s = sam_cfg.low_res_mask_size
    b = batch["image"].shape[0]
    if T > n_slots:
        raise ValueError(f"train.rounds={T} exceeds model.max_clicks={n_slots}")
    w_rounds = L.round_weight_vector(lc, T) if round_weights is None else round_weights

    image = preprocess_frame(batch["image"], batch["valid_hw"], sam_cfg)
    gt = batch["gt"] == 1
    valid = (batch["gt"] >= 0) & valid_mask(batch["valid_hw"], (f, f))
    if "embedding" in batch:  # cached by the frozen encoder (training/embedding_cache.py)
        emb = batch["embedding"].astype(jnp.float32)
    else:
        emb = model.apply({"params": params}, image, method=SamRef.embed_image)
    if not any(
        p == "sam" or p.startswith("sam/image_encoder") for p in effective_trainable(config)
    ):
        emb = jax.lax.stop_gradient(emb)

    fy, fx = batch["first_click"][:, 0], batch["first_click"][:, 1]
    coords = jnp.zeros((b, n_slots, 2), jnp.float32)
    coords = coords.at[:, 0].set(jnp.stack([fx, fy], -1).astype(jnp.float32))
    labels = jnp.full((b, n_slots), -1, jnp.int32).at[:, 0].set(1)
    ys = jnp.arange(f)[None, :, None]
    xs = jnp.arange(f)[None, None, :]

    def mark(cy: Array, cx: Array) -> Array:
        # (B, F, F) one-hot of the (B,) pixels: elementwise, so a sharded batch needs no
        # collective (an indexed scatter over the batch compiles to an all-gather).
        return (ys == cy[:, None, None]) & (xs == cx[:, None, None])

    clicked = mark(fy, fx)
    carry0 = dict(
        coords=coords,
        labels=labels,
        clicked=clicked,
        prev_low_res=jnp.zeros((b, s, s), jnp.float32),
        prev_logits=jnp.full((b, f, f), float(config.model.first_prev_logit), jnp.float32),
        has_prev=jnp.zeros((b,), bool),
    )
    stop_fb = bool(config.train.stop_grad_feedback)

    def body(carry, t):
        x = ClickInputs(
            embedding=emb,
            image=image,
            coords=carry["coords"],
            labels=carry["labels"],
            num_clicks=jnp.full((b,), t + 1, jnp.int32),
            prev_low_res=carry["prev_low_res"],
            has_prev=carry["has_prev"],
            prev_logits=carry["prev_logits"],
            valid_hw=batch["valid_hw"],
            radius=batch["radius"],
        )
        out = model.apply({"params": params}, x, mode, method=SamRef.click)
        terms = L.round_losses(out, gt, valid, mode, lc)
        pred = jax.lax.stop_gradient(out.final_logits) > 0
        iou = L.iou_per_sample(pred, gt, valid)
        cy, cx, pos = jax.vmap(next_click_jax)(gt, pred, carry["clicked"], valid)
        slot = jnp.minimum(t + 1, n_slots - 1)
        write = t + 1 < n_slots
        new_xy = jnp.stack([cx, cy], -1).astype(jnp.float32)
        coords = jnp.where(write, carry["coords"].at[:, slot].set(new_xy), carry["coords"])
        labels = jnp.where(
            write, carry["labels"].at[:, slot].set(pos.astype(jnp.int32)), carry["labels"]
        )
        clicked = carry["clicked"] | mark(cy, cx)
        fb = jax.lax.stop_gradient if stop_fb else (lambda a: a)
        prev_low_res, prev_logits = feedback_inputs(out)
        new = dict(
            coords=coords,
            labels=labels,
            clicked=clicked,
            prev_low_res=fb(prev_low_res),
            prev_logits=fb(prev_logits),
            has_prev=jnp.ones((b,), bool),
        )
        # Per-sample values leave the loop; the batch means (collectives once sharded) are
        # taken after it.
        return new, (terms, iou)

    unroll = bool(config.train.get("scan_unroll", False))
    _, (terms, ious) = jax.lax.scan(body, carry0, jnp.arange(T), unroll=unroll)
    terms = {k: jnp.mean(v, axis=1) for k, v in terms.items()}  # (T, B) -> (T,)
    ious = jnp.mean(ious, axis=1)
    loss = jnp.sum(w_rounds * terms["total"]) / jnp.maximum(jnp.sum(w_rounds), 1e-6)
    metrics = {"loss": loss, "iou": ious}  # iou: (T,)
    metrics.update({f"loss_{k}": v for k, v in terms.items()})  # each (T,)
    return loss, metrics


# ------------------------------------------------------------------------------- sharding


def make_mesh(devices: Any | None = None) -> jax.sharding.Mesh:
    """1-D ``('data',)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Array]:
    """This process's slice of the global batch -> global arrays sharded along 'data'."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def make_train_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    params_template: Any,
    donate: bool = True,
) -> Any:
    """``step(state, batch) -> (state, metrics)``, jit-compiled with state replicated and the
    batch sharded over ``mesh``; the state is donated."""
    model = model_of(config)
    tx = make_optimizer(config, params_template)
    rep, bsh = replicated(mesh), batch_sharding(mesh)

    def step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
        TRACE_COUNT["train_step"] += 1
        grad_fn = jax.value_and_grad(unrolled_loss, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, model, config)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = learning_rate_schedule(config.train)(state.step)
        new = TrainState(state.step + 1, params, opt_state, state.rng)
        return new, metrics

    return jax.jit(
        step,
        in_shardings=(rep, bsh),
        out_shardings=(rep, rep),
        donate_argnums=(0,) if donate else (),
    )


def make_grad_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """``grads(params, batch, round_weights) -> (loss, metrics, grads)`` (tests, diagnostics)."""
    model = model_of(config)

    def fn(params, batch, round_weights=None):
        (loss, metrics), grads = jax.value_and_grad(unrolled_loss, has_aux=True)(
            params, batch, model, config, round_weights
        )
        return loss, metrics, grads

    if mesh is None:
        return jax.jit(fn)
    rep, bsh = replicated(mesh), batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, bsh, rep), out_shardings=(rep, rep, rep))


def put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    sh = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sh), tree)
