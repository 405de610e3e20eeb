"""`Backbone`: a timm ViT behind the one feature interface (`ViTFeatures`).

Images enter in ``[0, 1]`` RGB; each backbone normalises with its own mean/std, so a teacher and a
student with different pre-processing (EVA02 uses CLIP statistics, DINOv2/DeiT ImageNet's) can share
one batch, and an exported segmentor takes raw ``[0, 1]`` input.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from gkd.models.features import ViTFeatures


class Backbone(nn.Module):
    """Wraps a timm ViT (``VisionTransformer`` or ``Eva``) as ``self.model``.

    ``self.model.state_dict()`` is exactly the timm model's, so a saved student encoder loads back
    into a plain ``timm.create_model(arch)``.
    """

    def __init__(self, model: nn.Module, name: str, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def has_cls_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an input of ``height x width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def resolve_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """Negative layer indices count from the last block (``-1`` = last)."""
        for raw in layers:
            if not -self.depth <= raw < self.depth:
                raise ValueError(f"layer {raw} out of range for {self.name} with {self.depth} blocks")
        return tuple(i % self.depth for i in layers)

    def forward(
        self,
        images: torch.Tensor,
        layers: Sequence[int] = (-1,),
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> ViTFeatures:
        """Tokens of ``layers`` for ``images`` ``(B, 3, H, W)`` in ``[0, 1]``.

        With ``mask`` (``(B, N)`` bool over the patch grid) the embeddings of masked patches are
        replaced by ``mask_token`` (``(C,)``, owned by the caller, e.g. a distiller) before the
        position embedding, as in masked image modelling.
        """
        layers = self.resolve_layers(layers)
        grid = self.grid_size(*images.shape[-2:])
        # timm's patch embedding rejects sizes that are not a multiple of the patch (512 at patch 14); its
        # stride-p convolution ignores the remainder pixels anyway, so crop them: the grid is floor(H/p) x floor(W/p).
        images = images[..., : grid[0] * self.patch_size, : grid[1] * self.patch_size]
        x = (images - self.mean) / self.std
        with self._masked_patches(mask, mask_token):
            outputs = self.model.forward_intermediates(
                x,
                indices=list(layers),
                return_prefix_tokens=True,
                norm=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
        patch_tokens = [spatial for spatial, _ in outputs]
        cls_tokens = [prefix[:, 0] if self.has_cls_token else None for _, prefix in outputs]
        return ViTFeatures(patch_tokens=patch_tokens, cls_tokens=cls_tokens, grid=grid, layers=layers)

    @contextmanager
    def _masked_patches(self, mask: torch.Tensor | None, mask_token: torch.Tensor | None):
        # timm's forward_intermediates has no masking argument; a forward hook on the patch embedding
        # swaps masked embeddings for the mask token and works the same for ViT and EVA02 (RoPE) blocks.
        if mask is None:
            yield
            return
        if mask_token is None:
            raise ValueError("a mask needs a mask_token")

        def replace(_module: nn.Module, _inputs: tuple, embeddings: torch.Tensor) -> torch.Tensor:
            flat_mask = mask.reshape(embeddings.shape[0], *embeddings.shape[1:-1], 1)
            return torch.where(flat_mask, mask_token.to(embeddings.dtype), embeddings)

        handle = self.model.patch_embed.register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()
