"""Plain feature distillation with a projector: the "MSE" row of GKD's Table 4.

For each layer pair ``l`` (student tokens ``S_l`` on the student grid, teacher tokens ``T_l``)::

    L_mse = w * mean_l  mean_{b,i,c} ( P_l(A(S_l))_{b,i,c} - T_l_{b,i,c} )^2

``P_l`` is a linear projector (student width -> teacher width), ``A`` the bilinear resampling of the
student grid onto the teacher grid. This is the representation-learning term
``|| F_t(x) - F_s(x) ||_2^2`` of the GKD poster's "Motivation" equation (Lv et al., CVPR 2026),
averaged over tokens and channels (FitNets-style hint loss through a learned projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gkd.compress.losses.base import FeatureDistillLoss, LayerPairOptions, paired_student_tokens, total
from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures


class MSELoss(FeatureDistillLoss):
    """Projected token-wise mean squared error."""

    class Options(LayerPairOptions):
        weight: float = Field(1.0, ge=0)

    def __init__(self, options: Options, student_dim: int, teacher_dim: int, num_classes: int | None = None) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        self.weight = options.weight
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in self.student_layers)

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        losses = []
        for i, projector in enumerate(self.projectors):
            tokens = paired_student_tokens(student_feats, i, teacher_feats.grid)
            losses.append(F.mse_loss(projector(tokens).float(), teacher_feats.patch_tokens[i].float()))
        return total({"loss_mse": self.weight * torch.stack(losses).mean()})
