"""The training step: one jit-compiled, data-parallel step that unrolls T click rounds.

Layout: a 1-D ``('data',)`` mesh over all devices (of all processes); the ``TrainState`` is
replicated, the batch is sharded along its leading axis. The step is ``jax.jit`` with explicit
``NamedSharding``s; inside it a ``jax.shard_map`` (:func:`data_parallel_grads`) runs the unroll
and its gradient per device on the device's slice, and one ``lax.pmean`` after it averages
loss, metrics and gradients (means over the global batch), so no collective runs inside any
loop (docs/design.md, 'Training step'; tests/training/test_sharded_hlo.py).

Inside the step (:func:`unrolled_loss`):

1. ``E = embed_image(image)`` (under ``stop_gradient`` when the encoder is not trainable);
2. ``lax.scan`` over T rounds: ``SamRef.click`` -> per-round losses (``losses.round_losses``)
   -> the next click from :func:`next_click_jax` on the round's final mask vs GT (discrete, no
   gradient), added to the ``ClickState`` that ``SamRef.click`` returned with SAM's next mask
   input and the final logits fed back by the model's one feedback rule
   (``ClickState.feed_back``; ``model.feedback``), differentiably unless
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

from collections.abc import Callable
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
from samref_jax.samref.model import ClickState, SamRef, init_samref_params
from samref_jax.training import losses as L

Array = jax.Array

# The mesh axis the batch is sharded over.
DATA_AXIS = "data"

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


def model_of(config: ml_collections.ConfigDict, training: bool = False) -> SamRef:
    """The SamRef module of ``config``; ``training`` selects per row in SAM's prompt encoder
    instead of a batch-wide ``cond`` (``PromptEncoder.mask_cond``; same numbers)."""
    dtype = jnp.bfloat16 if config.train.dtype == "bfloat16" else jnp.float32
    return SamRef(ml_collections.FrozenConfigDict(config.model), dtype, mask_cond=not training)


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
    valid_hw int32 (B, 2); first_click int32 (B, 2) (y, x); radius float32 (B,); with
    ``refiners.patch_diff.image_scale`` k > 1 also detail_image uint8 (B, kF, kF, 3).
    ``round_weights`` (T,) overrides ``loss.round_weights`` (a traced value: tests vary it).
    """
    mode = str(config.mode)
    T = int(config.train.rounds)
    lc = config.loss
    sam_cfg = sam_config_from(config.model)
    n_slots = int(config.model.max_clicks)
    f = sam_cfg.img_size
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

    # The image context with its per-image caches (SAM's positional encoding, GlobalDiff's
    # inputs, the decoder's first-layer projections), computed once before the rounds: every
    # round reads them, and their parameters' gradients sum over the rounds. Then the first click.
    detail = None
    if "detail_image" in batch:  # PatchDiff's image source at image_scale k x the frame
        k = batch["detail_image"].shape[1] // f
        detail = preprocess_frame(batch["detail_image"], batch["valid_hw"] * k, sam_cfg)
    ctx = model.apply(
        {"params": params},
        image,
        batch["valid_hw"],
        batch["radius"],
        emb,
        detail_image=detail,
        method=SamRef.prepare,
    )
    fy, fx = batch["first_click"][:, 0], batch["first_click"][:, 1]
    first_xy = jnp.stack([fx, fy], -1).astype(jnp.float32)
    state0 = ClickState.empty(config.model, b).add_click(first_xy, jnp.ones((b,), jnp.int32))
    ys = jnp.arange(f)[None, :, None]
    xs = jnp.arange(f)[None, None, :]

    def mark(cy: Array, cx: Array) -> Array:
        # (B, F, F) one-hot of the (B,) pixels: elementwise, so a sharded batch needs no
        # collective (an indexed scatter over the batch compiles to an all-gather).
        return (ys == cy[:, None, None]) & (xs == cx[:, None, None])

    stop_fb = bool(config.train.stop_grad_feedback)

    def body(carry, t):
        state, clicked = carry
        out, state = model.apply({"params": params}, ctx, state, mode, method=SamRef.click)
        # Named scopes label these ops in profiles (benchmarks/train_step.py --profile).
        with jax.named_scope("losses"):
            terms = L.round_losses(out, gt, valid, mode, lc)
        pred = jax.lax.stop_gradient(out.final_logits) > 0
        iou = L.iou_per_sample(pred, gt, valid)
        with jax.named_scope("clicker"):
            cy, cx, pos = jax.vmap(next_click_jax)(gt, pred, clicked, valid)
        if stop_fb:
            state = jax.lax.stop_gradient(state)
        state = state.add_click(jnp.stack([cx, cy], -1), pos)
        # Per-sample values leave the loop; the batch means (collectives once sharded) are
        # taken after it.
        return (state, clicked | mark(cy, cx)), (terms, iou)

    if bool(config.train.get("remat", False)):
        # Keep only each round's carry (and what the policy saves); the rest of its activations
        # are recomputed in the backward pass.
        body = jax.checkpoint(body, policy=remat_policy(config))
    unroll = bool(config.train.get("scan_unroll", False))
    carry0 = (state0, mark(fy, fx))
    _, (terms, ious) = jax.lax.scan(body, carry0, jnp.arange(T), unroll=unroll)
    terms = {k: jnp.mean(v, axis=1) for k, v in terms.items()}  # (T, B) -> (T,)
    ious = jnp.mean(ious, axis=1)
    loss = jnp.sum(w_rounds * terms["total"]) / jnp.maximum(jnp.sum(w_rounds), 1e-6)
    metrics = {"loss": loss, "iou": ious}  # iou: (T,)
    metrics.update({f"loss_{k}": v for k, v in terms.items()})  # each (T,)
    return loss, metrics


def remat_policy(config: ml_collections.ConfigDict) -> Callable[..., bool]:
    """``jax.checkpoint_policies``' function named by ``train.remat_policy`` (default
    ``nothing_saveable``); an unknown name is a ValueError that lists the known ones."""
    name = str(config.train.get("remat_policy", "nothing_saveable"))
    known = sorted(n for n in vars(jax.checkpoint_policies) if n.endswith("saveable"))
    if name not in known:
        raise ValueError(f"train.remat_policy {name!r} is none of {', '.join(known)}")
    return getattr(jax.checkpoint_policies, name)


# ------------------------------------------------------------------------------- sharding


def make_mesh(devices: Any | None = None) -> jax.sharding.Mesh:
    """1-D ``('data',)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Array]:
    """This process's slice of the global batch -> global arrays sharded along 'data'."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def data_parallel_grads(
    fn: Callable[..., tuple[Array, dict[str, Array], Any]], mesh: jax.sharding.Mesh
) -> Callable[..., tuple[Array, dict[str, Array], Any]]:
    """Run ``fn(params, batch, round_weights) -> (loss, metrics, grads)`` on each device's slice
    of the batch (``jax.shard_map`` over ``'data'``) and average the results across devices
    with one ``lax.pmean`` after it.

    ``fn`` sees plain per-device arrays: the batch (B / n, ...) and full copies of ``params``
    and ``round_weights``, so nothing inside it (the T-round scan, its backward pass, SAM's
    prompt encoder) can reduce across devices; the only collective of the returned function is
    the final all-reduce. Loss and metrics are batch means, so with equal slices the mean of the
    per-device means is the global mean, and the gradient of the global mean is the mean of the
    per-device gradients. Outputs are replicated.
    """

    def per_device(params: Any, batch: dict[str, Array], round_weights: Array | None):
        return jax.lax.pmean(fn(params, batch, round_weights), DATA_AXIS)

    # check_vma=False: ``fn`` is ordinary single-device code (its scan carries start from
    # constants), and the gradient it takes inside is per device -- with the check on, the
    # gradient of the replicated ``params`` would be summed across devices where they are used,
    # inside the scan's backward. The pmean makes every output replicated, as out_specs says.
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P()),
        out_specs=P(),
        check_vma=False,
    )


def stop_frozen(params: Any, trainable: Any) -> Any:
    """``params`` with ``lax.stop_gradient`` on every leaf outside the ``trainable`` prefixes
    (:func:`param_labels`): their gradients are zeros that cost nothing, so the step never
    computes, for example, the weight gradients of SAM's frozen prompt encoder, whose mask input
    still passes the refined logits' gradient back to earlier rounds."""
    labels = param_labels(params, trainable)
    return jax.tree_util.tree_map(
        lambda x, lab: x if lab == "train" else jax.lax.stop_gradient(x), params, labels
    )


def loss_and_grads(config: ml_collections.ConfigDict) -> Callable[..., Any]:
    """``fn(params, batch, round_weights) -> (loss, metrics, grads)`` of :func:`unrolled_loss`;
    the gradients of frozen leaves are zeros (:func:`stop_frozen`)."""
    model = model_of(config, training=True)
    trainable = effective_trainable(config)

    def loss_fn(params: Any, batch: dict[str, Array], round_weights: Array | None):
        return unrolled_loss(stop_frozen(params, trainable), batch, model, config, round_weights)

    def fn(params: Any, batch: dict[str, Array], round_weights: Array | None = None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, round_weights
        )
        return loss, metrics, grads

    return fn


def make_train_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    params_template: Any,
    donate: bool = True,
) -> Any:
    """``step(state, batch) -> (state, metrics)``, jit-compiled with state replicated and the
    batch sharded over ``mesh``; the state is donated.

    Loss, metrics and gradients come from :func:`data_parallel_grads` (per-device unroll, one
    all-reduce after it); the optimizer update then runs replicated on every device.
    """
    tx = make_optimizer(config, params_template)
    rep, bsh = replicated(mesh), batch_sharding(mesh)
    grads_fn = data_parallel_grads(loss_and_grads(config), mesh)

    def step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
        TRACE_COUNT["train_step"] += 1
        _, metrics, grads = grads_fn(state.params, batch, None)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)  # frozen leaves' are zeros
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
    """``grads(params, batch, round_weights) -> (loss, metrics, grads)`` (tests, diagnostics);
    with ``mesh``, data-parallel exactly as in :func:`make_train_step`."""
    fn = loss_and_grads(config)
    if mesh is None:
        return jax.jit(fn)
    rep, bsh = replicated(mesh), batch_sharding(mesh)
    return jax.jit(
        data_parallel_grads(fn, mesh),
        in_shardings=(rep, bsh, rep),
        out_shardings=(rep, rep, rep),
    )


def put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    sh = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sh), tree)
