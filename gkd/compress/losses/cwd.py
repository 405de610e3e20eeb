"""CWD, channel-wise distillation: Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021 (Eq. 2-4).

Each channel ``c`` of a ``(B, C, H, W)`` map ``y`` becomes a distribution over the spatial positions
``i``, ``phi(y_c)_i = exp(y_{c,i} / tau) / sum_j exp(y_{c,j} / tau)``, and the student's is pulled to
the teacher's::

    L_cwd = w * tau^2 / (B * C) * sum_{b,c} sum_i phi(y^T_{b,c})_i * log( phi(y^T_{b,c})_i / phi(y^S_{b,c})_i )

One function, :func:`channel_wise_divergence`, serves two registered losses:

* ``cwd`` (a feature loss): the maps are encoder tokens, the student's passed through a linear projector
  (a 1x1 convolution on the token map) to the teacher's width and resampled onto the teacher's grid;
  one projector per layer pair, the divergence averaged over pairs. This is CWD as a feature
  distillation strategy (GKD's Table 4 compares it with MSE, ViTKD and QSD).
* ``cwd_logits`` (a logit loss): the maps are the segmentation logits of student and teacher segmentors
  (CWD's main setting, GKD's Table 1/2 baseline); pixels marked in ``ignore_mask`` are left out of every
  channel's spatial distribution.

Defaults follow the segmentation-KD scripts built on the CWD code: ``tau = 4`` (``CriterionCWD(
norm_type='channel', divergence='kl', temperature=4.0)``), weight 3 on logits and 50 on features
(``--lambda-cwd-logit 3``, ``--lambda-cwd-fea 50`` in the CIRKD / Af-DCD ``train_kd.py`` scripts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gkd.compress.losses.base import (
    FeatureDistillLoss,
    LayerPairOptions,
    LogitDistillLoss,
    paired_student_tokens,
    total,
)
from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures, tokens_to_map

# Logit given to excluded positions: its softmax weight underflows to exactly 0 while every
# log-probability stays finite, so excluded positions add exactly 0 to the divergence.
_EXCLUDED = -1.0e9


def channel_wise_divergence(
    student_map: torch.Tensor, teacher_map: torch.Tensor, temperature: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``tau^2 / (B * C) * sum_{b,c} KL(phi(teacher_{b,c}) || phi(student_{b,c}))``, each channel
    softmax-normalised over the valid positions.

    Args:
        student_map: the student's ``(B, C, H, W)`` map.
        teacher_map: the teacher's, of the same shape.
        temperature: ``tau``.
        valid: ``(B, H, W)`` bool, the positions that count (``None``: all).
    """
    s = student_map.float().flatten(2) / temperature
    t = teacher_map.float().flatten(2) / temperature
    if valid is not None:
        excluded = ~valid.flatten(1)[:, None, :]
        s = s.masked_fill(excluded, _EXCLUDED)
        t = t.masked_fill(excluded, _EXCLUDED)
    log_p_t = F.log_softmax(t, dim=-1)
    log_p_s = F.log_softmax(s, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return temperature**2 * kl.mean()


class CWDLoss(FeatureDistillLoss):
    """Channel-wise distillation of encoder tokens (``cwd``)."""

    class Options(LayerPairOptions):
        temperature: float = Field(4.0, gt=0)
        weight: float = Field(50.0, ge=0)

    def __init__(self, options: Options, student_dim: int, teacher_dim: int, num_classes: int | None = None) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in self.student_layers)

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        grid = teacher_feats.grid
        losses = []
        for i, projector in enumerate(self.projectors):
            tokens = projector(paired_student_tokens(student_feats, i, grid))
            losses.append(
                channel_wise_divergence(
                    tokens_to_map(tokens, grid),
                    tokens_to_map(teacher_feats.patch_tokens[i], grid),
                    self.options.temperature,
                )
            )
        return total({"loss_cwd": self.options.weight * torch.stack(losses).mean()})


class CWDLogitsLoss(LogitDistillLoss):
    """Channel-wise distillation of segmentation logits (``cwd_logits``)."""

    term = "loss_cwd"

    class Options(LogitDistillLoss.Options):
        temperature: float = Field(4.0, gt=0)
        weight: float = Field(3.0, ge=0)

    def divergence(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        return channel_wise_divergence(student_logits, teacher_logits, self.options.temperature, valid)
