"""The shape QSD and Proteus share: per layer pair a class-token term, a feature term and a masked-patch
term, each through its own head, weighted and averaged over the pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gkd.compress.losses.base import (
    FeatureDistillLoss,
    LayerPairOptions,
    class_tokens,
    feature_term,
    masked_patch_term,
    masked_student_pass,
    paired_student_tokens,
    total,
    weighted_pair_means,
)
from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures, align_mask


@dataclass(frozen=True)
class TermNames:
    """The names of a `TokenTermsLoss`: its own, its terms' and its heads'."""

    loss: str  # named in errors
    terms: tuple[str, str, str]  # the loss names of the class-token, feature and patch terms
    cls_head: str
    patch_head: str
    masked_only: bool  # the patch term averages over the masked tokens only, else over every token


class TokenTermsLoss(FeatureDistillLoss):
    """Per layer pair ``i``, through the heads of ``self.heads[i]``: the MSE of the class tokens (head
    ``cls_head``, when `cls_term`), the feature term of the unmasked pass (head ``feature``; its tokens led by
    the class tokens when there is a ``cls_head``) and the masked-patch term of a masked student pass (head
    ``patch_head``, options ``mask_ratio`` and ``mask_probability``). Subclasses say which heads there are and
    build each, and name and weigh the terms."""

    NAMES: ClassVar[TermNames]

    def __init__(
        self, options: LayerPairOptions, student_dim: int, teacher_dim: int, num_classes: int | None = None
    ) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        switches = self.head_switches()
        self.heads = nn.ModuleList(
            nn.ModuleDict({key: self.new_head(key, student_dim, teacher_dim) for key, on in switches.items() if on})
            for _ in self.student_layers
        )
        self.mask_token = nn.Parameter(torch.zeros(student_dim)) if switches[self.NAMES.patch_head] else None

    def head_switches(self) -> dict[str, bool]:
        """Which of the heads ``cls_head``, ``feature`` and ``patch_head`` each layer pair has, in that order."""
        raise NotImplementedError

    def new_head(self, key: str, student_dim: int, teacher_dim: int) -> nn.Module:
        """A new head ``key`` (of `head_switches`) from the student's width to the teacher's."""
        raise NotImplementedError

    def cls_term(self) -> bool:
        """Whether the class tokens' MSE is a term of its own."""
        raise NotImplementedError

    def predict(self, head: nn.Module, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The float32 ``(B, N, C_t)`` tokens ``head`` predicts from the student's ``tokens`` (the teacher's:
        ``target``)."""
        raise NotImplementedError

    def weights(self) -> tuple[float, float, float]:
        """The weights of the class-token, feature and patch terms."""
        raise NotImplementedError

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        opts, names = self.options, self.NAMES
        masked = mask = None
        if self.mask_token is not None:
            masked, mask = masked_student_pass(
                student, images, student_feats, opts.mask_ratio, opts.mask_probability, self.mask_token
            )
            mask = align_mask(mask, student_feats.grid, teacher_feats.grid) if names.masked_only else None
        losses: tuple[list[torch.Tensor], ...] = ([], [], [])
        for i, head in enumerate(self.heads):
            target = teacher_feats.patch_tokens[i].float()
            cls_pair = None
            if names.cls_head in head:
                cls_pair = class_tokens(head[names.cls_head], student_feats, teacher_feats, i, names.loss)
            if self.cls_term():
                losses[0].append(F.mse_loss(*cls_pair))
            if "feature" in head:
                tokens = paired_student_tokens(student_feats, i, teacher_feats.grid)
                losses[1].append(feature_term(self.predict(head["feature"], tokens, target), target, cls_pair))
            if masked is not None:
                tokens = paired_student_tokens(masked, i, teacher_feats.grid)
                losses[2].append(masked_patch_term(self.predict(head[names.patch_head], tokens, target), target, mask))
        terms = dict(zip(names.terms, zip(self.weights(), losses, strict=True), strict=True))
        return total(weighted_pair_means(terms))
