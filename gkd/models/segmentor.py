"""`Segmentor(encoder, decoder)`: ``forward(images) -> logits`` at input resolution, nothing else in
the graph (so what is trained is what is exported)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gkd.models.backbone import Backbone
from gkd.models.decoders import upsample_logits


class Segmentor(nn.Module):
    """A ViT encoder, the layers it feeds, and a decoder. Input ``(B, 3, H, W)`` in ``[0, 1]``."""

    def __init__(self, encoder: Backbone, decoder: nn.Module, layers: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.layers = encoder.resolve_layers(layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encoder(images, layers=self.layers).maps(), images.shape[-2:])

    def decode(self, maps: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Decoder logits for encoder maps, upsampled to ``size``."""
        return upsample_logits(self.decoder(maps), tuple(size))
