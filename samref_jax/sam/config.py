"""Architecture configurations of SAM v1 (vit_b, vit_l, vit_h) and small test variants.

Example:
  >>> from samref_jax.sam.config import sam_config
  >>> cfg = sam_config("vit_b")
  >>> cfg.encoder_embed_dim, cfg.encoder_depth, cfg.image_embedding_size
  (768, 12, 64)
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Every size of a SAM model. Frozen (hashable) so it can be a Linen attribute."""

    name: str = "vit_b"
    img_size: int = 1024  # Square input frame, pixels.
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256  # Neck output channels and prompt/decoder width.
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # Global attention in blocks of this many queries (a loop; the same numbers): -1 = auto
    # (128 on the CPU backend, where the whole (heads, HW, HW) score matrix is memory-bound,
    # all at once elsewhere), 0 = all at once.
    global_attn_query_block: int = -1

    @property
    def image_embedding_size(self) -> int:
        """Side of the (square) image embedding grid, tokens (64 for a 1024 frame)."""
        return self.img_size // self.patch_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's low-resolution masks, pixels (256 for a 1024 frame)."""
        return 4 * self.image_embedding_size

    def replace(self, **kwargs: Any) -> SamConfig:
        return dataclasses.replace(self, **kwargs)


_CONFIGS = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(
        name="vit_l",
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamConfig(
        name="vit_h",
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # Small SAM-shaped models for tests and CPU training. Same code paths as vit_b:
    # windowed blocks with padding (8 -> 10 tokens for window 5), global blocks, neck.
    "tiny": SamConfig(
        name="tiny",
        img_size=128,
        patch_size=16,
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=5,
        prompt_embed_dim=32,
        decoder_num_heads=4,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
        mask_in_chans=8,
    ),
}


def sam_config(model_type: str, **overrides: Any) -> SamConfig:
    """Returns the named config (`vit_b`, `vit_l`, `vit_h`, `tiny`) with overrides applied."""
    if model_type not in _CONFIGS:
        raise ValueError(
            f"unknown SAM model type {model_type!r}; expected one of {sorted(_CONFIGS)}"
        )
    return _CONFIGS[model_type].replace(**overrides)


def available_configs() -> list[str]:
    return sorted(_CONFIGS)
