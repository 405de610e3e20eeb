"""ViTs with a convolutional stem, registered in timm's registry (``timm.create_model("vit_convstem16", ...)``).

Xiao et al., "Early Convolutions Help Transformers See Better" (NeurIPS 2021): replacing the 16x16 patchify
stem with four 3x3 stride-2 convolutions makes a ViT train faster, more stably and better from few images,
for about the compute of one more block. The CamVid benchmark trains its teacher from scratch on 305 frames,
where that is the difference between a teacher weaker and one stronger than its students.

timm has every part (``ConvStem``, ``HybridEmbed``, ``VisionTransformer``) but no model with a configurable
conv stem in front of a configurable ViT, so this module registers one. Being a timm model, it is built,
saved and loaded like any other (``Backbone``, ``save_encoder``): its architecture name and JSON kwargs
rebuild it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

CONVSTEM_ARCH = "vit_convstem16"

# `register_model` reads the model's default config from the module's `default_cfgs`; there are no weights.
default_cfgs = generate_default_cfgs(
    {f"{CONVSTEM_ARCH}.untrained": {"url": "", "num_classes": 0, "input_size": (3, 224, 224), "crop_pct": 1.0}}
)


@register_model
def vit_convstem16(
    pretrained: bool = False, stem_channels: tuple[int, ...] | list[int] | None = None, **kwargs: Any
) -> VisionTransformer:
    """A ViT (timm ``VisionTransformer``, any width/depth kwargs) whose patch embedding is four 3x3 stride-2
    convolutions (BatchNorm + ReLU between them; the last one projects to ``embed_dim``): stride 16, as ViT/16.

    Args:
        pretrained: must be ``False``; no weights exist for this architecture.
        stem_channels: widths of the first three convolutions; default ``embed_dim // 8, // 4, // 2``.
        kwargs: ``VisionTransformer`` kwargs (``embed_dim``, ``depth``, ``num_heads``, ``img_size``, ...).
    """
    if pretrained:
        raise ValueError(f"{CONVSTEM_ARCH} has no pretrained weights; load local ones through a recipe's `weights:`")
    if kwargs.pop("patch_size", 1) != 1:
        raise ValueError(f"{CONVSTEM_ARCH}: the conv stem's stride is 16, its patch size cannot be changed")
    embed_dim = kwargs.setdefault("embed_dim", 384)
    kwargs.setdefault("depth", 12)
    kwargs.setdefault("num_heads", 6)
    channels = tuple(stem_channels) if stem_channels else (embed_dim // 8, embed_dim // 4, embed_dim // 2)
    if len(channels) != 3:
        raise ValueError(f"stem_channels: three widths (the fourth convolution outputs embed_dim), got {channels}")
    stem = ConvStem(
        in_chans=kwargs.get("in_chans", 3),
        depth=4,
        channels=(*channels, embed_dim),
        kernel_size=3,
        stride=(2, 2, 2, 2),
        padding=1,
        act_layer=nn.ReLU,
    )
    return build_model_with_cfg(
        VisionTransformer,
        CONVSTEM_ARCH,
        pretrained=False,
        pretrained_filter_fn=checkpoint_filter_fn,
        embed_layer=partial(HybridEmbed, backbone=stem, proj=False),
        patch_size=1,
        **kwargs,
    )
