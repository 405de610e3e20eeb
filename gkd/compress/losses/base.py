"""The contract every distillation loss implements, and the helpers the feature losses share.

Two kinds of loss:

* ``"feature"``: ``forward(student_feats, teacher_feats, student, images)`` compares encoder tokens.
  ``student_feats`` are ``student(images, layers=self.student_layers)`` (unmasked, with gradients);
  ``teacher_feats`` are the frozen teacher's tokens for ``self.teacher_layers`` (no gradients, possibly
  fp16/bf16). A loss that needs a masked student pass runs it itself with its own ``mask_token``.
* ``"logit"``: ``forward(student_logits, teacher_logits, ignore_mask=None)`` compares ``(B, K, H, W)``
  segmentation logits.

Conventions shared by every feature loss:

* Student and teacher are paired layer by layer: ``student_layers[i]`` with ``teacher_layers[i]``.
* The student is brought to the teacher: its width by projectors the loss owns (trained with the
  student, never saved into it), its token grid by bilinear resampling onto the teacher's grid
  (:func:`student_on_teacher_grid`), so targets are always the teacher's tokens as computed.
  (The official GKD code resizes the patch embeddings so both grids coincide; recipes do the same with
  ``models.*.patch_size`` and ``distill.task_agnostic_patch_size``, and the resampling is then a no-op.)
* Every loss returns ``{"loss": total, "loss_<term>": weighted term (detached), ...}``.
"""

from __future__ import annotations

import functools
import operator
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures, align_tokens


class DistillLoss(nn.Module):
    """Base class of every distillation loss; ``Options`` holds its recipe options (paper defaults)."""

    kind: ClassVar[str]
    student_layers: tuple[int, ...] = ()
    teacher_layers: tuple[int, ...] = ()

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, options: Options, student_dim: int, teacher_dim: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.options = options


class LayerPairOptions(DistillLoss.Options):
    """Options of a feature loss: which student layer is distilled from which teacher layer
    (negative = counted from the last block; ``-1`` = last)."""

    student_layers: tuple[int, ...] = Field((-1,), min_length=1)
    teacher_layers: tuple[int, ...] = Field((-1,), min_length=1)

    @model_validator(mode="after")
    def _paired(self) -> LayerPairOptions:
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(
                f"student_layers {self.student_layers} and teacher_layers {self.teacher_layers} must pair up "
                "(same length)"
            )
        return self


class SingleLayerOptions(LayerPairOptions):
    """Options of a feature loss defined on one layer pair only."""

    @model_validator(mode="after")
    def _single(self) -> SingleLayerOptions:
        if len(self.student_layers) != 1:
            raise ValueError(
                f"student_layers/teacher_layers: this loss takes one layer pair, got {self.student_layers}"
            )
        return self


class FeatureDistillLoss(DistillLoss):
    """A loss on encoder tokens (see the module docstring for the call contract)."""

    kind: ClassVar[str] = "feature"

    def __init__(
        self, options: LayerPairOptions, student_dim: int, teacher_dim: int, num_classes: int | None = None
    ) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        self.student_layers = tuple(options.student_layers)
        self.teacher_layers = tuple(options.teacher_layers)

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LogitDistillLoss(DistillLoss):
    """A loss on ``(B, K, H, W)`` segmentation logits of a student and a teacher segmentor."""

    kind: ClassVar[str] = "logit"

    def __init__(
        self, options: DistillLoss.Options, student_dim: int, teacher_dim: int, num_classes: int | None = None
    ) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        self.num_classes = num_classes

    def check_logits(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """Both ``(B, K, H, W)`` of one shape, ``K`` = ``num_classes`` when that is known."""
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 4:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "must both be (B, K, H, W) of one shape"
            )
        if self.num_classes is not None and student_logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {student_logits.shape[1]} classes, expected {self.num_classes}")

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, ignore_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def ln_linear(in_dim: int, out_dim: int) -> nn.Sequential:
    """``LayerNorm`` then ``Linear``: the projection head of Proteus and of every QSD head."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))


def total(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"loss": sum of terms, **terms detached}`` (the terms are for logging only)."""
    # reduce(add), not sum(): sum() starts from int 0, which torch.compile turns into a loss without grad
    out = {"loss": functools.reduce(operator.add, terms.values())}
    out.update({key: value.detach() for key, value in terms.items()})
    return out


def student_on_teacher_grid(tokens: torch.Tensor, grid: tuple[int, int], teacher_grid: tuple[int, int]) -> torch.Tensor:
    """Student ``(B, N_s, C)`` tokens resampled onto the teacher's grid, in float32."""
    return align_tokens(tokens.float(), grid, teacher_grid)


def teacher_cls(teacher_feats: ViTFeatures, index: int, loss_name: str) -> torch.Tensor:
    """The teacher's class token of pair ``index`` in float32; an error if the teacher has none."""
    cls = teacher_feats.cls_tokens[index]
    if cls is None:
        raise ValueError(f"{loss_name}: the teacher has no class token; switch the class-token term off")
    return cls.float()


def student_cls(student_feats: ViTFeatures, index: int, loss_name: str) -> torch.Tensor:
    """The student's class token of pair ``index``; an error if the student has none."""
    cls = student_feats.cls_tokens[index]
    if cls is None:
        raise ValueError(f"{loss_name}: the student has no class token; switch the class-token term off")
    return cls


def masked_student_pass(
    student: Backbone,
    images: torch.Tensor,
    layers: tuple[int, ...],
    grid: tuple[int, int],
    ratio: float,
    probability: float,
    mask_token: torch.Tensor,
) -> tuple[ViTFeatures, torch.Tensor]:
    """The student's tokens for ``images`` with ``int(N * ratio)`` random patches of the first
    ``int(B * probability)`` samples replaced by ``mask_token`` (the masking of Proteus and GKD's
    released code: ``--mask_probability``, ``--mask_ratio``, ``--mask_first_n``); returns the features
    and the ``(B, N)`` mask on the student's grid ``grid``."""
    batch, num_tokens = images.shape[0], grid[0] * grid[1]
    count = int(num_tokens * ratio)
    mask = random_token_mask(batch, num_tokens, count, images.device, masked_samples=int(batch * probability))
    return student(images, layers=layers, mask=mask, mask_token=mask_token), mask


def random_token_mask(
    batch: int, num_tokens: int, count: int, device: torch.device, masked_samples: int | None = None
) -> torch.Tensor:
    """``(B, N)`` bool mask with exactly ``count`` random tokens set in each of the first
    ``masked_samples`` samples (all samples when ``None``) and none in the others.

    Uses ``torch.rand``, so the trainer's seeding makes it reproducible.
    """
    ranks = torch.rand(batch, num_tokens, device=device).argsort(dim=1).argsort(dim=1)
    mask = ranks < count
    if masked_samples is not None:
        mask[masked_samples:] = False
    return mask
