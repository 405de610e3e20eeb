"""Segmentation decoders for plain ViT encoders (multi-layer tokens -> dense logits).

smp's encoders reject plain ViTs and its DPT assumes stride 16, so a ViT needs a neck that builds a
pyramid from single-scale tokens. We use ViTDet's simple feature pyramid (Li et al., ECCV 2022:
deconvolutions x4 / x2, identity, max-pool /2 from the ViT's layers) and feed smp's `UPerNetDecoder`,
which resizes to its own targets and so fits patch 14 and 16 grids alike. `linear` is DINOv2's
linear-probe head (BN + 1x1 conv over concatenated layers), cheap enough for CPU runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn

DecoderName = Literal["uper", "linear", "mask2former"]  # the keys of `DECODERS`


class DecoderConfig(BaseModel):
    """Recipe block `decoder:`."""

    model_config = ConfigDict(extra="forbid")

    name: DecoderName = "uper"
    channels: int = Field(256, gt=0, description="decoder width (uper, mask2former)")
    layers: tuple[int, ...] | None = Field(
        None,
        description="encoder blocks to tap (negative = from the end); default: 4 evenly spaced (uper), last "
        "(linear), the authors' [3, 5, 7, 11] of 12 (mask2former)",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="before the classifier (uper, linear)")
    queries: int = Field(100, gt=0, description="mask2former: learned queries")
    pixel_decoder_layers: int = Field(6, gt=0, description="mask2former: deformable-attention layers")
    decoder_layers: int = Field(9, gt=0, description="mask2former: masked-attention decoder layers")
    points: int = Field(12544, gt=0, description="mask2former: points per mask for the matcher and mask losses")


def default_layers(depth: int, name: str) -> tuple[int, ...]:
    """The encoder blocks decoder ``name`` reads unless the recipe says (`DecoderSpec.default_layers`)."""
    return DECODERS[name].default_layers(depth)


def _four_evenly_spaced(depth: int) -> tuple[int, ...]:
    """Four evenly spaced blocks ending at the last one (fewer when ``depth`` < 4)."""
    step = depth / 4
    return tuple(sorted({max(0, round(step * (i + 1)) - 1) for i in range(4)}))


def _authors_mask2former_taps(depth: int) -> tuple[int, ...]:
    """The GKD authors' Mask2Former taps, blocks [3, 5, 7, 11] of 12, scaled to ``depth`` ([7, 11, 15, 23] of 24)."""
    return tuple(round(depth * k / 12) - 1 for k in (4, 6, 8, 12))


class SimpleFeaturePyramid(nn.Module):
    """Four ViT maps at stride p -> maps at strides p/4, p/2, p, 2p (ViTDet's simple pyramid)."""

    def __init__(self, embed_dim: int, out_channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        c4, c8, c16, c32 = out_channels
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim // 2, 2, stride=2),
            nn.BatchNorm2d(embed_dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim // 2, c4, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(embed_dim, c8, 2, stride=2)
        self.same = nn.Conv2d(embed_dim, c16, 1)
        self.down2 = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(embed_dim, c32, 1))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), self.same(maps[2]), self.down2(maps[3])]


class UPerHead(nn.Module):
    """Simple feature pyramid from four ViT layers + smp's UPerNet (PPM + FPN) + classifier."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        pyramid_channels = (embed_dim // 4, embed_dim // 2, embed_dim, embed_dim)
        self.pyramid = SimpleFeaturePyramid(embed_dim, pyramid_channels)
        # smp skips the two highest-resolution entries (strides 1 and 2); give it placeholders' widths.
        self.uper = UPerNetDecoder(
            encoder_channels=(3, embed_dim // 8, *pyramid_channels), encoder_depth=5, decoder_channels=channels
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if len(maps) != 4:
            raise ValueError(f"UPerHead takes 4 encoder layers, got {len(maps)}")
        fused = self.uper([maps[0], maps[0], *self.pyramid(maps)])
        return self.classifier(self.dropout(fused))


class LinearHead(nn.Module):
    """BatchNorm + 1x1 convolution over the concatenated layers (DINOv2's linear segmentation probe)."""

    def __init__(self, embed_dim: int, num_layers: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        width = embed_dim * num_layers
        self.norm = nn.BatchNorm2d(width)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(torch.cat(maps, dim=1))))


def _mask2former(config: DecoderConfig, embed_dim: int, layers: tuple[int, ...], num_classes: int) -> nn.Module:
    # Imported here: it needs the optional `transformers` dependency.
    from gkd.models.mask2former import Mask2FormerHead, mask2former_config

    head_config = mask2former_config(
        num_classes, config.channels, config.queries, config.pixel_decoder_layers, config.decoder_layers, config.points
    )
    return Mask2FormerHead(embed_dim, head_config)


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder of the registry: how it is built from its recipe block, the encoder width, its taps and the
    class count; the blocks it reads by default for an encoder of a given depth; how many taps it takes."""

    build: Callable[[DecoderConfig, int, tuple[int, ...], int], nn.Module]
    default_layers: Callable[[int], tuple[int, ...]]
    num_layers: int | None = None  # None: any number


# The registry (as smp's MODEL_ARCHITECTURES_MAPPING): a new decoder is a class, a line here and a name in
# `DecoderName`; tests/test_decoders.py checks every entry (any input size, export parity).
DECODERS: dict[str, DecoderSpec] = {
    "uper": DecoderSpec(lambda c, dim, _, k: UPerHead(dim, k, c.channels, c.dropout), _four_evenly_spaced, 4),
    "linear": DecoderSpec(lambda c, dim, taps, k: LinearHead(dim, len(taps), k, c.dropout), lambda d: (d - 1,)),
    "mask2former": DecoderSpec(_mask2former, _authors_mask2former_taps, 4),
}


def build_decoder(
    config: DecoderConfig, embed_dim: int, depth: int, num_classes: int
) -> tuple[nn.Module, tuple[int, ...]]:
    """The decoder and the encoder layers it reads.

    Args:
        config: the recipe's decoder block (its ``layers``, or the decoder's default taps).
        embed_dim: the encoder's token width.
        depth: the encoder's number of blocks (for the default taps).
        num_classes: output classes.
    """
    spec = DECODERS[config.name]
    layers = tuple(config.layers) if config.layers else spec.default_layers(depth)
    if spec.num_layers is not None and len(layers) != spec.num_layers:
        raise ValueError(f"decoder.layers: {config.name} takes {spec.num_layers} layers, got {layers}")
    return spec.build(config, embed_dim, layers, num_classes), layers


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, K, h, w)`` logits to the input size."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
