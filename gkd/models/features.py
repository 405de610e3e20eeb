"""The one feature interface every loss and decoder consumes, and token-grid alignment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ViTFeatures:
    """Tokens of chosen layers of a ViT for one batch.

    ``patch_tokens[i]`` is ``(B, N, C)`` with ``N = grid[0] * grid[1]`` (row-major), register tokens
    excluded; ``cls_tokens[i]`` is ``(B, C)`` (``None`` for models without a class token);
    ``layers[i]`` is the (non-negative) block index the tokens come from.
    """

    patch_tokens: list[torch.Tensor]
    cls_tokens: list[torch.Tensor | None]
    grid: tuple[int, int]
    layers: tuple[int, ...]

    @property
    def last(self) -> torch.Tensor:
        """Patch tokens of the deepest requested layer, ``(B, N, C)``."""
        return self.patch_tokens[-1]

    @property
    def cls(self) -> torch.Tensor | None:
        """Class token of the deepest requested layer, ``(B, C)``."""
        return self.cls_tokens[-1]

    def maps(self) -> list[torch.Tensor]:
        """Patch tokens of every layer as ``(B, C, h, w)`` maps."""
        return [tokens_to_map(t, self.grid) for t in self.patch_tokens]


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, N, C)`` tokens -> ``(B, C, h, w)`` map."""
    b, n, c = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` map -> ``(B, h*w, C)`` tokens."""
    return feature_map.flatten(2).transpose(1, 2)


def align_tokens(tokens: torch.Tensor, grid: tuple[int, int], target_grid: tuple[int, int]) -> torch.Tensor:
    """Resample ``(B, N, C)`` tokens on ``grid`` to ``target_grid`` (bilinear), the alignment every
    token-wise loss uses when teacher (patch 14) and student (patch 16) grids differ."""
    if tuple(grid) == tuple(target_grid):
        return tokens
    resized = F.interpolate(tokens_to_map(tokens, grid), size=target_grid, mode="bilinear", align_corners=False)
    return map_to_tokens(resized)


def align_mask(mask: torch.Tensor, grid: tuple[int, int], target_grid: tuple[int, int]) -> torch.Tensor:
    """Resample a ``(B, N)`` boolean patch mask to another grid (nearest neighbour)."""
    if tuple(grid) == tuple(target_grid):
        return mask
    b = mask.shape[0]
    as_map = mask.float().reshape(b, 1, *grid)
    return F.interpolate(as_map, size=target_grid, mode="nearest").reshape(b, -1) > 0.5
