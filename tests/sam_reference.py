"""Builds the official PyTorch SAM at any size with every parameter randomised (test helper)."""

from __future__ import annotations

from functools import partial

import numpy as np

from samref_jax.sam.config import SamConfig
from tests import torchvision_stub

torchvision_stub.install()

import segment_anything  # noqa: E402
import torch  # noqa: E402
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)


def build_torch_sam(cfg: SamConfig) -> Sam:
    """The official `Sam` with the sizes of `cfg` (same constructor calls as build_sam.py)."""
    grid = cfg.image_embedding_size
    dim = cfg.prompt_embed_dim
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.img_size,
            mlp_ratio=cfg.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg.encoder_global_attn_indexes,
            window_size=cfg.window_size,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.img_size, cfg.img_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    )
    return sam.eval()


_EMBEDDING_PREFIXES = (
    "prompt_encoder.point_embeddings",
    "prompt_encoder.not_a_point_embed",
    "prompt_encoder.no_mask_embed",
    "mask_decoder.iou_token",
    "mask_decoder.mask_tokens",
)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Sets EVERY parameter and the Fourier buffer to random values of a sensible scale.

    Weights ~ N(0, gain^2/fan_in) ; LayerNorm weights 1 + N(0, 0.2); biases N(0, 0.1); pos_embed and
    rel_pos tables N(0, 0.2); token embeddings N(0, 1). Nothing is left at its default init.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=p.dtype)
        leaf = name.split(".")[-1]
        if "rel_pos" in leaf or leaf == "pos_embed":
            p.copy_(0.2 * r)
        elif leaf == "bias":
            p.copy_(0.1 * r)
        elif p.ndim == 1:  # LayerNorm weights
            p.copy_(1.0 + 0.2 * r)
        elif name.startswith(_EMBEDDING_PREFIXES):
            p.copy_(r)
        else:
            fan_in = int(np.prod(p.shape[1:])) if "output_upscaling" not in name else p.shape[0]
            p.copy_(gain * r / np.sqrt(max(fan_in, 1)))
    for name, b in model.named_buffers():
        if "gaussian_matrix" in name:
            b.copy_(torch.randn(b.shape, generator=g))
    return model


def random_torch_sam(cfg: SamConfig, seed: int = 0) -> Sam:
    return randomize_(build_torch_sam(cfg), seed).requires_grad_(False)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


__all__ = ["build_torch_sam", "random_torch_sam", "randomize_", "segment_anything", "torch"]
