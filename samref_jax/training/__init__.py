"""End-to-end SAM-REF training: losses, input pipeline, the unrolled data-parallel step,
checkpoints and the training loop (``train``). Entry point: ``python -m train.main``."""

from samref_jax.training.config import base_config
from samref_jax.training.losses import default_loss_config, round_losses
from samref_jax.training.step import (
    TrainState,
    create_state,
    init_params,
    make_grad_fn,
    make_mesh,
    make_optimizer,
    make_train_step,
    shard_batch,
    unrolled_loss,
)

__all__ = [
    "TrainState",
    "base_config",
    "create_state",
    "default_loss_config",
    "init_params",
    "make_grad_fn",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "round_losses",
    "shard_batch",
    "train",
    "unrolled_loss",
]


def train(*args, **kwargs):  # noqa: D103 - lazy: see samref_jax.training.trainer.train
    from samref_jax.training.trainer import train as _train

    return _train(*args, **kwargs)
