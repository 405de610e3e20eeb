"""Af-DCD: Fan et al., "Augmentation-free Dense Contrastive Knowledge Distillation for Efficient
Semantic Segmentation", NeurIPS 2023 (Sec. 3: masked feature mimicking + omni-contrastive loss).

The student's tokens (resampled onto the teacher grid, projected to the teacher width ``C`` by a
1x1 convolution ``A``) form a map; each position is zeroed with probability ``zeta`` (mask ``m``) and a
projector ``G`` (``Conv3x3 -> ReLU -> Conv3x3``) predicts the teacher's map ``T`` from it::

    F       = G( m * A(S) )
    L_fd    = lambda_fd / B * sum ( F - T )^2

Omni-contrastive term: both maps are max-pooled (``pool_size``), cut into local windows of
``local_size x local_size`` positions and their channels into ``M`` groups of ``C / M``; inside a window
every (position, group) item ``f_k`` of ``F`` has its positive in the teacher's same item ``t_k`` and its
negatives in the teacher's items of the *other* channel groups (any position of the window); the
similarity is the negative L1 distance ``s(a, b) = -||a - b||_1``::

    L_ctr = lambda_ctr / (B * H' W') * sum_windows sum_k -log( exp(s(f_k, t_k) / tau) /
                ( exp(s(f_k, t_k) / tau) + sum_{j: group(j) != group(k)} exp(s(f_k, t_j) / tau) ) )

(``H' x W'`` the pooled map). ``L = L_fd + L_ctr``.

Source: the paper and its code (github.com/OSVAI/Af-DCD, ``losses/ocmgd.py``: class
``OmniContrastiveFeatureLoss``; ``train_scripts/cityscape/*.sh``). Defaults are the code's: ``tau = 0.07``,
``M = 16``, ``pool_size = 4``, ``local_size = 4``, random masking with ``zeta = 0.75`` (its Cityscapes
script switches to the fixed centre mask, ``mask_mode: center``), ``lambda_fd = 2e-6``,
``lambda_ctr = 5e-3`` (Cityscapes script). Adaptation to small token grids (not in the code, which
assumes CNN feature maps): pooling and windows shrink to the map when it is smaller than them, and
rows/columns beyond a whole number of windows are left out of the contrastive term.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gkd.compress.losses.base import (
    FeatureDistillLoss,
    SingleLayerOptions,
    conv3x3_generator,
    paired_student_tokens,
    total,
)
from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures, tokens_to_map


def omni_contrastive(
    student_map: torch.Tensor, teacher_map: torch.Tensor, groups: int, local_size: int, temperature: float
) -> torch.Tensor:
    """Sum over all items of the InfoNCE loss above, divided by the map's ``H * W`` (not by ``B``).

    Args:
        student_map: the projected student's ``(B, C, H, W)`` map ``F``.
        teacher_map: the teacher's map ``T``, of the same shape.
        groups: ``M``, the channel groups (must divide ``C``).
        local_size: the side of the local windows.
        temperature: ``tau``.
    """
    b, c, h, w = student_map.shape
    ph, pw = min(local_size, h), min(local_size, w)
    h, w = h // ph * ph, w // pw * pw

    def items(x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B * windows, ph * pw * M, C / M); item index = position * M + group.
        x = x[:, :, :h, :w].reshape(b, groups, c // groups, h // ph, ph, w // pw, pw)
        return x.permute(0, 3, 5, 4, 6, 1, 2).reshape(-1, ph * pw * groups, c // groups)

    s, t = items(student_map.float()), items(teacher_map.float())
    similarity = -torch.cdist(s, t, p=1) / temperature
    num_items = similarity.shape[1]
    group = torch.arange(num_items, device=similarity.device) % groups
    negatives = group[:, None] != group[None, :]
    positive = similarity.diagonal(dim1=1, dim2=2)[..., None]
    negative = similarity.masked_select(negatives).reshape(similarity.shape[0], num_items, -1)
    logits = torch.cat([positive, negative], dim=-1)
    return -F.log_softmax(logits, dim=-1)[..., 0].sum() / (h * w)


class AfDCDLoss(FeatureDistillLoss):
    """Masked feature mimicking plus the omni-contrastive loss on one layer pair."""

    class Options(SingleLayerOptions):
        lambda_fd: float = Field(2e-6, ge=0, description="weight of masked feature mimicking")
        lambda_ctr: float = Field(5e-3, ge=0, description="weight of the omni-contrastive term")
        temperature: float = Field(0.07, gt=0)
        groups: int = Field(16, ge=1, description="M: channel groups")
        pool_size: int = Field(4, ge=1, description="max-pooling before the contrastive term (1 = none)")
        local_size: int = Field(4, ge=1, description="side of the local windows of the contrastive term")
        mask_mode: Literal["random", "center"] = "random"
        mask_ratio: float = Field(0.75, ge=0, le=1, description="zeta: fraction zeroed (random mode)")

    def __init__(self, options: Options, student_dim: int, teacher_dim: int, num_classes: int | None = None) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        if teacher_dim % options.groups:
            raise ValueError(f"af_dcd: groups {options.groups} does not divide the teacher width {teacher_dim}")
        self.align = nn.Linear(student_dim, teacher_dim)
        self.projector = conv3x3_generator(teacher_dim)

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        opts, grid = self.options, teacher_feats.grid
        tokens = paired_student_tokens(student_feats, 0, grid)
        aligned = tokens_to_map(self.align(tokens), grid)
        predicted = self.projector(aligned * self._keep(aligned)).float()
        target = tokens_to_map(teacher_feats.patch_tokens[0], grid).float()
        batch = predicted.shape[0]
        terms = {"loss_fd": opts.lambda_fd * (predicted - target).pow(2).sum() / batch}
        pool = min(opts.pool_size, *grid)
        if pool > 1:
            predicted, target = F.max_pool2d(predicted, pool), F.max_pool2d(target, pool)
        contrastive = omni_contrastive(predicted, target, opts.groups, opts.local_size, opts.temperature)
        terms["loss_ctr"] = opts.lambda_ctr * contrastive / batch
        return total(terms)

    def _keep(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` 0/1 map of the positions kept (not masked)."""
        b, _, h, w = feature_map.shape
        if self.options.mask_mode == "random":
            return (torch.rand(b, 1, h, w, device=feature_map.device) <= 1 - self.options.mask_ratio).to(
                feature_map.dtype
            )
        keep = torch.ones(b, 1, h, w, device=feature_map.device, dtype=feature_map.dtype)
        keep[:, :, h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 0
        return keep
