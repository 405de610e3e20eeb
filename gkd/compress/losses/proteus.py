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
from pydantic import Field, model_validator
from torch import nn

from gkd.compress.losses.base import LayerPairOptions, ln_linear
from gkd.compress.losses.token_terms import TermNames, TokenTermsLoss


class ProteusLoss(TokenTermsLoss):
    """Token (CLS), feature and masked-patch MSE through ``LayerNorm + Linear`` heads."""

    NAMES = TermNames("proteus", ("loss_token", "loss_feat", "loss_patch"), "token", "patch", masked_only=True)

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

    def head_switches(self) -> dict[str, bool]:
        opts = self.options
        return {
            "token": opts.token_weight > 0 or opts.feature_weight > 0,
            "feature": opts.feature_weight > 0,
            "patch": opts.patch_weight > 0,
        }

    def new_head(self, key: str, student_dim: int, teacher_dim: int) -> nn.Module:
        return ln_linear(student_dim, teacher_dim)

    def cls_term(self) -> bool:
        return self.options.token_weight > 0

    def predict(self, head: nn.Module, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return head(tokens).float()

    def weights(self) -> tuple[float, float, float]:
        return self.options.token_weight, self.options.feature_weight, self.options.patch_weight
