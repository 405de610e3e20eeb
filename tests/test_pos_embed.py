"""Position embeddings at a new input size are resampled as each model's official code does (issue 22)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from gkd.models.zoo import create_backbone

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def official_dinov2_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int, patch: int):
    """The reference: ``interpolate_pos_encoding`` of facebookresearch/dinov2's ``vision_transformer.py`` for the
    hub models without registers (``interpolate_antialias=False``, ``interpolate_offset=0.1``), written from its
    formula: the class slot kept, the patch grid scaled by ``(new + 0.1) / old`` with bicubic, no antialias."""
    patches = pos_embed[:, 1:].float()
    side = int(math.sqrt(patches.shape[1]))
    rows, cols = height // patch, width // patch
    if rows * cols == side * side and rows == cols:
        return pos_embed
    grid = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((rows + 0.1) / side, (cols + 0.1) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (rows, cols)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def _smooth_pos_embed(vit: VisionTransformer) -> None:
    """A position embedding with the low-frequency structure trained ones have (random init is almost flat)."""
    side = vit.patch_embed.grid_size[0]
    coarse = torch.randn(1, vit.embed_dim, 6, 6, generator=torch.Generator().manual_seed(0))
    patches = F.interpolate(coarse, size=(side, side), mode="bicubic").flatten(2).transpose(1, 2)
    with torch.no_grad():
        vit.pos_embed.copy_(torch.cat([torch.randn(1, 1, vit.embed_dim), patches], dim=1))


@pytest.mark.parametrize("size", [(448, 448), (448, 602), (224, 224), (518, 518)])
def test_dinov2_without_registers_resamples_as_the_official_code(size):
    vit = create_backbone("dinov2_vits14", **TINY).model
    _smooth_pos_embed(vit)
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        embedded = vit.patch_embed(images)
        ours = vit._pos_embed(embedded)
        timms = VisionTransformer._pos_embed(vit, embedded)
        flat = embedded.flatten(1, 2)
        reference = torch.cat([vit.cls_token.expand(2, -1, -1), flat], dim=1)
        reference = reference + official_dinov2_interpolate_pos_encoding(vit.pos_embed, *size, patch=14)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    if size != (518, 518):  # timm's antialiased resampling is another function: the check above can fail
        assert (timms - ours).abs().max() > 1e-2


def test_dinov2_with_registers_keeps_timms_resampling_which_is_the_official_one():
    """The hub models with registers interpolate to the output size, bicubic, antialiased: timm's own way."""
    vit = create_backbone("dinov2_vits14_reg", **TINY).model
    assert "_pos_embed" not in vars(vit)
    side = vit.patch_embed.grid_size[0]
    pos_embed = torch.randn(1, side * side, vit.embed_dim)
    grid = pos_embed.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    official = F.interpolate(grid, size=(32, 43), mode="bicubic", antialias=True)
    official = official.permute(0, 2, 3, 1).reshape(1, 32 * 43, -1)
    resampled = resample_abs_pos_embed(pos_embed, new_size=[32, 43], old_size=[side, side], num_prefix_tokens=0)
    torch.testing.assert_close(resampled, official, rtol=0, atol=1e-6)


def test_other_vits_keep_timms_resampling():
    for name in ("deit_small", "eva02_small", "vit_small_patch16_224"):
        assert "_pos_embed" not in vars(create_backbone(name, **TINY).model)
