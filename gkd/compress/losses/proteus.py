"""Proteus (Zhang et al., "Accessing Vision Foundation Models at ImageNet-level Costs", ICLR 2025):
label-free distillation of a VFM through token-, feature- and patch-level objectives.

Per layer pair, with heads ``P_tok``, ``P_fea``, ``P_patch`` (each ``LayerNorm + Linear``, student
width -> teacher width), student tokens ``S`` resampled onto the teacher grid, teacher tokens ``T``::

    L_token   = MSE( P_tok(s_cls), t_cls )
    L_feature = MSE( [P_tok(s_cls) ; P_fea(S)], [t_cls ; T] )                 (unmasked pass)
    L_patch   = MSE over masked positions ( P_patch(S_masked), T )             (masked pass)
    L = lambda_token L_token + lambda_fea L_feature + lambda_patch L_patch

``S_masked``: a second student pass in which ``int(N * mask_ratio)`` random patches of the first
``int(B * mask_probability)`` images are replaced by a learned mask token; ``L_patch`` is averaged over
the masked positions only (mapped to the teacher grid by nearest neighbour) and is 0 when no patch is
masked.

Source: the paper's Sec. 3 (token-, patch- and feature-level learning objectives) and its released
code (github.com/BeSpontaneous/Proteus-pytorch, ``pretrain/models_proteus_dinov2.py``,
``pretrain/run_pretrain.sh``), which fixes the heads, the MSE criteria, the feature term's
concatenation of CLS and patch tokens and the defaults ``lambda_token = lambda_fea = lambda_patch = 1``,
``mask_probability = 0.5``, ``mask_ratio = 0.5``. A term whose weight is 0 is neither built nor
computed (the released CLIP setting uses ``lambda_fea = lambda_patch = 0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from gkd.compress.losses.base import (
    FeatureDistillLoss,
    LayerPairOptions,
    class_tokens,
    feature_term,
    ln_linear,
    masked_patch_term,
    masked_student_pass,
    paired_student_tokens,
    total,
    weighted_pair_means,
)
from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures, align_mask


class ProteusLoss(FeatureDistillLoss):
    """Token (CLS), feature and masked-patch MSE through ``LayerNorm + Linear`` heads."""

    class Options(LayerPairOptions):
        token_weight: float = Field(1.0, ge=0, description="lambda_token")
        feature_weight: float = Field(1.0, ge=0, description="lambda_fea")
        patch_weight: float = Field(1.0, ge=0, description="lambda_patch")
        mask_ratio: float = Field(0.5, ge=0, le=1)
        mask_probability: float = Field(0.5, ge=0, le=1)

        @model_validator(mode="after")
        def _some_term(self) -> ProteusLoss.Options:
            if self.token_weight == self.feature_weight == self.patch_weight == 0:
                raise ValueError("token_weight, feature_weight, patch_weight: at least one must be > 0")
            return self

    def __init__(self, options: Options, student_dim: int, teacher_dim: int, num_classes: int | None = None) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        heads = []
        for _ in self.student_layers:
            head = nn.ModuleDict()
            if options.token_weight > 0 or options.feature_weight > 0:
                head["token"] = ln_linear(student_dim, teacher_dim)
            if options.feature_weight > 0:
                head["feature"] = ln_linear(student_dim, teacher_dim)
            if options.patch_weight > 0:
                head["patch"] = ln_linear(student_dim, teacher_dim)
            heads.append(head)
        self.heads = nn.ModuleList(heads)
        self.mask_token = nn.Parameter(torch.zeros(student_dim)) if options.patch_weight > 0 else None

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        opts = self.options
        masked = mask = None
        if opts.patch_weight > 0:
            masked, mask = masked_student_pass(
                student, images, student_feats, opts.mask_ratio, opts.mask_probability, self.mask_token
            )
            mask = align_mask(mask, student_feats.grid, teacher_feats.grid)
        token_losses, feature_losses, patch_losses = [], [], []
        for i, head in enumerate(self.heads):
            target = teacher_feats.patch_tokens[i].float()
            cls_pair = (
                class_tokens(head["token"], student_feats, teacher_feats, i, "proteus") if "token" in head else None
            )
            if opts.token_weight > 0:
                token_losses.append(F.mse_loss(*cls_pair))
            if "feature" in head:
                tokens = paired_student_tokens(student_feats, i, teacher_feats.grid)
                feature_losses.append(feature_term(head["feature"](tokens).float(), target, cls_pair))
            if masked is not None:
                tokens = paired_student_tokens(masked, i, teacher_feats.grid)
                patch_losses.append(masked_patch_term(head["patch"](tokens).float(), target, mask))
        weighted = {
            "loss_token": (opts.token_weight, token_losses),
            "loss_feat": (opts.feature_weight, feature_losses),
            "loss_patch": (opts.patch_weight, patch_losses),
        }
        return total(weighted_pair_means(weighted))
