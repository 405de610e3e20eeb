"""A tiny ViT-S/16-shaped segmentor (random weights) that every export test can afford to export."""

from __future__ import annotations

import torch

from gkd.models.backbone import Backbone
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor


def tiny_segmentor(
    arch: str = "vit_small_patch16_224", depth: int = 4, decoder: str = "uper", seed: int = 0, num_classes: int = 11
) -> Segmentor:
    """``depth`` blocks of width 64 (2 heads) at a dynamic image size, ``decoder`` with 32 channels; 11 classes
    by default (CamVid's)."""
    torch.manual_seed(seed)
    kwargs = {"dynamic_img_size": True, "img_size": 64, "embed_dim": 64, "depth": depth, "num_heads": 2}
    backbone = Backbone("tiny", arch, kwargs, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return Segmentor(backbone, *build_decoder(DecoderConfig(name=decoder, channels=32), 64, depth, num_classes)).eval()
