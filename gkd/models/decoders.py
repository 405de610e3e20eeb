"""Segmentation decoders for plain ViT encoders (multi-layer tokens -> dense logits).

smp's encoders reject plain ViTs and its DPT assumes stride 16, so a ViT needs a neck that builds a
pyramid from single-scale tokens. We use ViTDet's simple feature pyramid (Li et al., ECCV 2022:
deconvolutions x4 / x2, identity, max-pool /2 from the ViT's layers) and feed smp's `UPerNetDecoder`,
which resizes to its own targets and so fits patch 14 and 16 grids alike. `linear` is DINOv2's
linear-probe head (BN + 1x1 conv over concatenated layers), cheap enough for CPU runs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn


class DecoderConfig(BaseModel):
    """Recipe block `decoder:`."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["uper", "linear"] = "uper"
    channels: int = Field(256, gt=0, description="decoder width (uper)")
    layers: tuple[int, ...] | None = Field(
        None,
        description="encoder blocks to tap (negative = from the end); default: 4 evenly spaced (uper), last (linear)",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


def default_layers(depth: int, name: str) -> tuple[int, ...]:
    """Four evenly spaced blocks ending at the last one (uper), or the last block only (linear)."""
    if name == "linear":
        return (depth - 1,)
    step = depth / 4
    return tuple(sorted({max(0, round(step * (i + 1)) - 1) for i in range(4)}))


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


def build_decoder(
    config: DecoderConfig, embed_dim: int, depth: int, num_classes: int
) -> tuple[nn.Module, tuple[int, ...]]:
    """The decoder and the encoder layers it reads."""
    layers = tuple(config.layers) if config.layers else default_layers(depth, config.name)
    if config.name == "uper":
        if len(layers) != 4:
            raise ValueError(f"decoder.layers: uper takes 4 layers, got {layers}")
        return UPerHead(embed_dim, num_classes, config.channels, config.dropout), layers
    return LinearHead(embed_dim, len(layers), num_classes, config.dropout), layers


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, K, h, w)`` logits to the input size."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
