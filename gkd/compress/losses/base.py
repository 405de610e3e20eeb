"""The contract every distillation loss implements, and the terms and helpers the losses share.

Each loss class says what it consumes (:class:`LossNeeds`, its ``needs``); recipe validation, the
pipeline and the objectives ask :func:`gkd.compress.losses.loss_needs` instead of testing loss names.

* Feature losses (``needs.inputs == "features"``): ``forward(student_feats, teacher_feats, student,
  images)`` compares encoder tokens. ``student_feats`` are ``student(images, layers=self.student_layers)``
  (unmasked, with gradients); ``teacher_feats`` are the frozen teacher's tokens for
  ``self.teacher_layers`` (no gradients, possibly fp16/bf16). A loss that needs a masked student pass
  runs it itself with its own ``mask_token``.
* Logit losses (``needs.inputs == "logits"``): ``forward(student_logits, teacher_logits,
  ignore_mask=None)`` compares ``(B, K, H, W)`` segmentation logits; the teacher is a segmentor whose
  head was trained on the labeled source.

Conventions shared by every feature loss:

* Student and teacher are paired layer by layer: ``student_layers[i]`` with ``teacher_layers[i]``.
* The student is brought to the teacher: its width by projectors the loss owns (trained with the
  student, never saved into it), its token grid by bilinear resampling onto the teacher's grid
  (:func:`student_on_teacher_grid`), so targets are always the teacher's tokens as computed.
  (The official GKD code resizes the patch embeddings so both grids coincide; recipes do the same with
  ``models.*.patch_size`` and ``distill.task_agnostic_patch_size``, and the resampling is then a no-op.)
* Every loss returns ``{"loss": total, "loss_<term>": weighted term (detached), ...}``.

Shared terms live here and the losses compose them, as DINOv2 composes ``DINOLoss``, ``iBOTPatchLoss``
and ``KoLeoLoss``: the CLS / feature / masked-patch terms of QSD and Proteus (:func:`class_tokens`,
:func:`feature_term`, :func:`masked_patch_term`), the ``Conv3x3 -> ReLU -> Conv3x3`` generator of Af-DCD
and ViTKD (:func:`conv3x3_generator`) and the masked mean of vanilla KD and Proteus (:func:`masked_mean`).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from gkd.models.backbone import Backbone
from gkd.models.features import ViTFeatures, align_tokens


@dataclass(frozen=True)
class LossNeeds:
    """What a distillation loss consumes, declared by its class.

    Args:
        inputs: ``"features"``: encoder tokens of student and teacher, at the layers the loss's
            ``student_layers`` / ``teacher_layers`` options name; ``"logits"``: ``(B, K, H, W)``
            segmentation logits of a student and a teacher segmentor.
    """

    inputs: Literal["features", "logits"]

    @property
    def teacher_segmentor(self) -> bool:
        """Whether the teacher must be a segmentor with a head trained on source (``teacher_training``),
        rather than the bare foundation-model encoder."""
        return self.inputs == "logits"

    @property
    def two_stage(self) -> bool:
        """Whether GKD's decoupled stage 1 can use the loss: it trains the encoder alone, so there are
        no student logits to compare."""
        return self.inputs == "features"


class DistillLoss(nn.Module):
    """Base class of every distillation loss; ``Options`` holds its recipe options (paper defaults),
    ``needs`` what it consumes."""

    needs: ClassVar[LossNeeds]
    student_layers: tuple[int, ...] = ()
    teacher_layers: tuple[int, ...] = ()

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, options: Options, student_dim: int, teacher_dim: int, num_classes: int | None = None) -> None:
        """Build the loss's own modules (projectors, heads, mask token).

        Args:
            options: the validated recipe options.
            student_dim: the student's token width.
            teacher_dim: the teacher's token width.
            num_classes: the logits' class count where known (checked by logit losses).
        """
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

    needs: ClassVar[LossNeeds] = LossNeeds(inputs="features")

    def __init__(
        self, options: LayerPairOptions, student_dim: int, teacher_dim: int, num_classes: int | None = None
    ) -> None:
        super().__init__(options, student_dim, teacher_dim, num_classes)
        self.student_layers = tuple(options.student_layers)
        self.teacher_layers = tuple(options.teacher_layers)

    def forward(
        self, student_feats: ViTFeatures, teacher_feats: ViTFeatures, student: Backbone, images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{"loss": total, "loss_<term>": weighted term (detached), ...}``.

        Args:
            student_feats: the student's tokens of ``student_layers`` (unmasked, with gradients).
            teacher_feats: the frozen teacher's tokens of ``teacher_layers``.
            student: the student, for losses that run their own masked pass.
            images: the batch both passes saw.
        """
        raise NotImplementedError


class LogitDistillLoss(DistillLoss):
    """A loss on ``(B, K, H, W)`` segmentation logits of a student and a teacher segmentor: ``weight`` times a
    `divergence` of the two, softened by ``temperature``, logged as ``term``."""

    needs: ClassVar[LossNeeds] = LossNeeds(inputs="logits")
    term: ClassVar[str]

    class Options(DistillLoss.Options):
        temperature: float = Field(1.0, gt=0, description="both segmentors' logits are divided by it")
        weight: float = Field(1.0, ge=0)

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
        """``{"loss": total, "loss_<term>": weighted term (detached), ...}``.

        Args:
            student_logits: the student segmentor's ``(B, K, H, W)`` logits.
            teacher_logits: the teacher segmentor's, of the same shape.
            ignore_mask: ``(B, H, W)`` bool, the pixels left out (label 255); ``None``: none.
        """
        self.check_logits(student_logits, teacher_logits)
        valid = None if ignore_mask is None else ~ignore_mask
        return total(self.terms(student_logits.float(), teacher_logits.float(), valid))

    def terms(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``{term: weight * divergence}`` for checked float32 logits."""
        return {self.term: self.options.weight * self.divergence(student_logits, teacher_logits, valid)}

    def divergence(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """The unweighted loss for checked float32 logits; ``valid`` (``(B, H, W)``): the pixels that count
        (``None``: all)."""
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
    """Student tokens resampled onto the teacher's grid (bilinear), in float32.

    Args:
        tokens: ``(B, N_s, C)`` tokens.
        grid: their ``(H, W)`` grid.
        teacher_grid: the teacher's ``(H, W)`` grid.
    """
    return align_tokens(tokens.float(), grid, teacher_grid)


def paired_student_tokens(student_feats: ViTFeatures, index: int, teacher_grid: tuple[int, int]) -> torch.Tensor:
    """The student's patch tokens of pair ``index`` on the teacher's grid, in float32.

    Args:
        student_feats: the student's features (either pass).
        index: the layer pair.
        teacher_grid: the teacher's ``(H, W)`` grid.
    """
    return student_on_teacher_grid(student_feats.patch_tokens[index], student_feats.grid, teacher_grid)


def masked_student_pass(
    student: Backbone,
    images: torch.Tensor,
    unmasked: ViTFeatures,
    ratio: float,
    probability: float,
    mask_token: torch.Tensor,
) -> tuple[ViTFeatures, torch.Tensor]:
    """A second student pass, of the layers of ``unmasked``, with ``int(N * ratio)`` random patches of
    the first ``int(B * probability)`` images replaced by ``mask_token`` (the masking of Proteus and
    GKD's released code: ``--mask_probability``, ``--mask_ratio``, ``--mask_first_n``).

    Args:
        student: the student backbone.
        images: the batch the unmasked pass saw.
        unmasked: that pass's features (their layers and grid are reused).
        ratio: the fraction of patches masked in a masked image.
        probability: the fraction of the batch that is masked.
        mask_token: the loss's learned ``(C_s,)`` mask token.

    Returns:
        The masked pass's features and the ``(B, N)`` bool mask on the student's grid.
    """
    grid = unmasked.grid
    batch, num_tokens = images.shape[0], grid[0] * grid[1]
    count = int(num_tokens * ratio)
    mask = random_token_mask(batch, num_tokens, count, images.device, masked_samples=int(batch * probability))
    return student(images, layers=unmasked.layers, mask=mask, mask_token=mask_token), mask


def random_token_mask(
    batch: int, num_tokens: int, count: int, device: torch.device, masked_samples: int | None = None
) -> torch.Tensor:
    """``(B, N)`` bool mask with exactly ``count`` random tokens set in each of the first
    ``masked_samples`` samples and none in the others.

    Uses ``torch.rand``, so the trainer's seeding makes it reproducible.

    Args:
        batch: ``B``.
        num_tokens: ``N``.
        count: the tokens masked per masked sample.
        device: where the mask lives.
        masked_samples: how many leading samples are masked (``None``: all).
    """
    ranks = torch.rand(batch, num_tokens, device=device).argsort(dim=1).argsort(dim=1)
    mask = ranks < count
    if masked_samples is not None:
        mask[masked_samples:] = False
    return mask


def class_tokens(
    head: nn.Module, student_feats: ViTFeatures, teacher_feats: ViTFeatures, index: int, loss_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's class token of pair ``index`` through ``head`` and the teacher's, both float32
    ``(B, C_t)``: the CLS term of QSD and Proteus is their MSE, and their feature term prepends them.

    Args:
        head: the projection of the student's class token to the teacher width.
        student_feats: the student's features (unmasked pass).
        teacher_feats: the teacher's features.
        index: the layer pair.
        loss_name: named in the error raised when either network has no class token.
    """
    student_cls, teacher_cls = student_feats.cls_tokens[index], teacher_feats.cls_tokens[index]
    for network, cls in (("teacher", teacher_cls), ("student", student_cls)):
        if cls is None:
            raise ValueError(f"{loss_name}: the {network} has no class token; switch the class-token term off")
    return head(student_cls).float(), teacher_cls.float()


def feature_term(
    predicted: torch.Tensor, target: torch.Tensor, cls_pair: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """``MSE([p_cls ; predicted], [t_cls ; target])`` over batch, tokens and channels: the feature term
    of QSD and Proteus.

    Args:
        predicted: ``(B, N, C_t)`` tokens predicted from the student's unmasked pass.
        target: the teacher's ``(B, N, C_t)`` tokens.
        cls_pair: :func:`class_tokens`'s ``(p_cls, t_cls)``, or ``None`` to compare the patch tokens alone.
    """
    if cls_pair is not None:
        predicted_cls, target_cls = cls_pair
        predicted = torch.cat([predicted_cls[:, None], predicted], dim=1)
        target = torch.cat([target_cls[:, None], target], dim=1)
    return F.mse_loss(predicted, target)


def masked_patch_term(predicted: torch.Tensor, target: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
    """The masked-patch term of QSD and Proteus: the MSE of the tokens predicted from the masked
    student pass against the teacher's.

    Args:
        predicted: ``(B, N, C_t)`` tokens predicted from the masked pass.
        target: the teacher's ``(B, N, C_t)`` tokens.
        masked: ``None`` to average over every token (QSD), or the ``(B, N)`` bool mask of the tokens
            averaged over (Proteus: the masked ones; 0 when none is).
    """
    if masked is None:
        return F.mse_loss(predicted, target)
    return masked_mean((predicted - target).pow(2).mean(dim=-1), masked)


def masked_mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` over the entries where the bool ``keep`` (same shape) holds, 0 when none
    does; the plain mean when ``keep`` is ``None``. Vanilla KD's mean over the pixels not ignored,
    Proteus's over the masked tokens."""
    if keep is None:
        return values.mean()
    weights = keep.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def weighted_pair_means(terms: dict[str, tuple[float, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """``{name: weight * mean of its per-layer-pair losses}`` for each ``name: (weight, losses)``, leaving
    out the names without losses (terms switched off)."""
    return {name: weight * torch.stack(losses).mean() for name, (weight, losses) in terms.items() if losses}


def conv3x3_generator(dim: int) -> nn.Sequential:
    """``Conv3x3 -> ReLU -> Conv3x3`` at width ``dim`` on a ``(B, C, H, W)`` token map: the projector
    ``G`` of Af-DCD and the generator ``G`` of ViTKD."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, kernel_size=3, padding=1),
    )
