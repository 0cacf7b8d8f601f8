"""Segment Anything (v1) in Flax: modules, config, transforms, converter and predictor."""

from samref_jax.sam.config import SamConfig, available_configs, sam_config
from samref_jax.sam.model import Sam, count_params, init_sam_params

__all__ = ["Sam", "SamConfig", "available_configs", "count_params", "init_sam_params", "sam_config"]
