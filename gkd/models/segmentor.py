"""`Segmentor(encoder, decoder)`: ``forward(images) -> logits`` at input resolution, nothing else in
the graph (so what is trained is what is exported)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gkd.models.backbone import Backbone
from gkd.models.decoders import upsample_logits
from gkd.models.features import ViTFeatures


class Segmentor(nn.Module):
    """A ViT encoder, the layers it feeds, and a decoder. Input ``(B, 3, H, W)`` in ``[0, 1]``."""

    def __init__(self, encoder: Backbone, decoder: nn.Module, layers: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.layers = encoder.resolve_layers(layers)
        # Mask2Former as the GKD authors build it reads raw block outputs, the other heads normalised tokens.
        self.normalised_taps = not getattr(decoder, "takes_raw_tokens", False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images).maps(), images.shape[-2:])

    def encode(self, images: torch.Tensor, layers: Sequence[int] | None = None) -> ViTFeatures:
        """Encoder tokens of ``layers`` (default: the decoder's), normalised or raw as the decoder takes them."""
        return self.encoder(images, layers=self.layers if layers is None else layers, norm=self.normalised_taps)

    def decode(self, maps: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Decoder logits for encoder maps, upsampled to ``size``."""
        return upsample_logits(self.decoder(maps), tuple(size))
