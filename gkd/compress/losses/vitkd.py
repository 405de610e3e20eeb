"""ViTKD: Yang et al., "ViTKD: Practical Guidelines for ViT feature knowledge distillation" (2022,
arXiv 2209.02432), Sec. 3: mimicking on shallow layers, generation on the deep layer.

Layer pairs ``(student_layers[i], teacher_layers[i])``: all but the last are *mimicked*, the last is
*generated*. Student tokens are resampled onto the teacher grid; ``P_i``, ``P_g`` are linear
projections to the teacher width (identities when the widths already match, as in the paper's code)::

    L_mimic = alpha * sum_i (1/B) sum_{b,n,c} ( P_i(S_i) - T_i )^2
    X       = P_g(S_g) with a random fraction lambda of its tokens replaced by a learned mask token M
    L_gen   = beta / lambda * (1/B) sum_{b,c} sum_{n masked} ( G(X) - T_g )^2
    L_vitkd = L_mimic + L_gen

``G`` is the generator ``Conv3x3 -> ReLU -> Conv3x3`` on the token map. The masking is applied to the
student's *output* tokens (in feature space; no masked student pass), ``N - int(N (1 - lambda))``
tokens of every image. Defaults are the paper's and its code's (github.com/yzd-v/cls_KD,
``mmcls/models/dis_losses/vitkd.py`` and the ``configs/distillers/imagenet/*`` settings): the first two
layers mimicked, the last generated, ``alpha = 3e-5``, ``beta = 3e-6``, ``lambda = 0.5``; losses are
summed squared errors divided by the batch size.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from gkd.compress.losses.base import (
    FeatureDistillLoss,
    LayerPairOptions,
    conv3x3_generator,
    paired_student_tokens,
    random_token_mask,
    total,
)
from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures, map_to_tokens, tokens_to_map


def width_projector(student_dim: int, teacher_dim: int) -> nn.Module:
    """Linear projection to the teacher's width; identity when the widths match."""
    return nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)


class ViTKDLoss(FeatureDistillLoss):
    """Shallow-layer mimicking plus masked deep-layer generation."""

    class Options(LayerPairOptions):
        student_layers: tuple[int, ...] = Field((0, 1, -1), min_length=1, description="last = generated")
        teacher_layers: tuple[int, ...] = Field((0, 1, -1), min_length=1, description="last = generated")
        alpha: float = Field(3e-5, ge=0, description="weight of mimicking")
        beta: float = Field(3e-6, ge=0, description="weight of generation")
        mask_ratio: float = Field(0.5, gt=0, le=1, description="lambda: fraction of deep tokens masked")

    def __init__(self, options: Options, student_dim: int, teacher_dim: int, num_classes: int | None = None) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        self.mimic = nn.ModuleList(width_projector(student_dim, teacher_dim) for _ in self.student_layers[:-1])
        self.align = width_projector(student_dim, teacher_dim)
        self.mask_token = nn.Parameter(torch.zeros(teacher_dim))
        self.generator = conv3x3_generator(teacher_dim)

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        opts, grid = self.options, teacher_feats.grid
        batch = images.shape[0]
        terms = {}
        if len(self.mimic):
            mimic_errors = []
            for i, projector in enumerate(self.mimic):
                mimicked = projector(paired_student_tokens(student_feats, i, grid)).float()
                mimic_errors.append((mimicked - teacher_feats.patch_tokens[i].float()).pow(2).sum())
            terms["loss_mimic"] = opts.alpha * torch.stack(mimic_errors).sum() / batch
        x = self.align(paired_student_tokens(student_feats, -1, grid))
        num_tokens = x.shape[1]
        mask = random_token_mask(batch, num_tokens, num_tokens - int(num_tokens * (1 - opts.mask_ratio)), x.device)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        generated = map_to_tokens(self.generator(tokens_to_map(x, grid))).float()
        squared = (generated - teacher_feats.patch_tokens[-1].float()).pow(2).sum(dim=-1)
        terms["loss_gen"] = opts.beta / opts.mask_ratio * (squared * mask).sum() / batch
        return total(terms)
