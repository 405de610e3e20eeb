"""Training objectives of the stages: what is computed on one batch, and what is trained.

A frozen teacher is held outside the module tree (``self._frozen``): it is never trained, never
wrapped by DDP and never written into a training checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gkd.compress.losses import DistillLoss, loss_needs
from gkd.compress.teacher_cache import cached_features, cached_outputs, feature_outputs
from gkd.data.base import IGNORE_INDEX
from gkd.models.backbone import Backbone
from gkd.models.decoders import upsample_logits
from gkd.models.features import ViTFeatures
from gkd.models.segmentor import Segmentor


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def select_layers(features: ViTFeatures, layers: tuple[int, ...]) -> ViTFeatures:
    """The subset of ``features`` for ``layers`` (each must be present)."""
    where = [features.layers.index(layer) for layer in layers]
    return ViTFeatures(
        patch_tokens=[features.patch_tokens[i] for i in where],
        cls_tokens=[features.cls_tokens[i] for i in where],
        grid=features.grid,
        layers=tuple(layers),
    )


def segmentation_loss(
    segmentor: Segmentor, maps: list[torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits at the labels' size and the task loss of the segmentor's decoder: cross-entropy (ignore 255),
    or the decoder's own loss where it has one (Mask2Former's set loss on its per-layer query outputs).

    Args:
        segmentor: the segmentor whose decoder runs.
        maps: the encoder's feature maps of the decoder's layers.
        labels: ``(B, H, W)`` train ids.
    """
    decoder, size = segmentor.decoder, labels.shape[-2:]
    if hasattr(decoder, "forward_queries"):
        queries = decoder.forward_queries(maps)
        logits = upsample_logits(decoder.semantic(queries), tuple(size))
        return logits, decoder.loss(queries, labels)
    logits = segmentor.decode(maps, size)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    return logits, {"loss": loss, "loss_ce": loss.detach()}


class WithFrozenTeacher(nn.Module):
    """Holds the frozen teacher outside the module tree (never trained or checkpointed); ``teacher`` None: none."""

    def __init__(self, teacher: nn.Module | None, teacher_dtype: torch.dtype) -> None:
        super().__init__()
        self._frozen = () if teacher is None else (freeze(teacher).to(teacher_dtype),)
        self.teacher_dtype = teacher_dtype

    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen[0] if self._frozen else None


class DistillObjective(WithFrozenTeacher):
    """Stage 1 (GKD 1a/1b): ``L_distill(F_t(x), F_s(x))``; trains the student encoder and the loss's
    own heads (projectors, mask token).

    A batch of `gkd.compress.teacher_cache.TeacherViews` carries the teacher's tokens of its views; the teacher
    then does not run (`teacher_outputs` is what the cache stored).

    Args:
        student: the student encoder.
        loss: a loss usable in stage 1 (``loss_needs(loss).two_stage``: it compares encoder tokens).
        teacher: the frozen teacher encoder.
        teacher_dtype: the teacher's precision.
    """

    def __init__(self, student: Backbone, loss: DistillLoss, teacher: Backbone, teacher_dtype: torch.dtype) -> None:
        needs = loss_needs(loss)
        if not needs.two_stage:
            raise ValueError(f"{type(loss).__name__} takes {needs.inputs}; stage 1 has no decoder to produce them")
        super().__init__(teacher, teacher_dtype)
        self.student = student
        self.loss = loss
        self.teacher_layers = teacher.resolve_layers(loss.teacher_layers)
        self.student_layers = student.resolve_layers(loss.student_layers)

    def teacher_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's tokens of the loss's layers by name (`feature_outputs`), without gradients."""
        with torch.no_grad():
            return feature_outputs(self.teacher(images.to(self.teacher_dtype), layers=self.teacher_layers))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        outputs = cached_outputs(batch) or self.teacher_outputs(images)
        grid = self.teacher.grid_size(*images.shape[-2:])
        teacher_features = cached_features(outputs, grid, self.teacher_layers, self.teacher_dtype)
        student_features = self.student(images, layers=self.student_layers)
        return self.loss(student_features, teacher_features, self.student, images)


class TaskObjective(nn.Module):
    """The task loss of a segmentor (`segmentation_loss`); with ``freeze_encoder`` only the decoder trains
    (GKD stage 2)."""

    def __init__(self, segmentor: Segmentor, freeze_encoder: bool) -> None:
        super().__init__()
        self.segmentor = segmentor
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            freeze(segmentor.encoder)

    def train(self, mode: bool = True) -> TaskObjective:
        super().train(mode)
        if self.freeze_encoder:
            self.segmentor.encoder.eval()
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            maps = self.segmentor.encode(batch["image"]).maps()
        return segmentation_loss(self.segmentor, maps, batch["label"])[1]


class JointObjective(WithFrozenTeacher):
    """The conventional one-stage schedule: ``L_task(H(F_s(x)), y) + w * L_distill`` on source data.

    Feature losses compare encoder tokens (one student pass serves decoder and loss); logit losses
    compare the segmentor's logits with a teacher segmentor's (``loss_needs(loss).inputs`` says which).

    Args:
        student: the student segmentor; encoder and decoder both train.
        loss: the distillation loss.
        teacher: the teacher backbone (feature losses) or trained teacher segmentor (logit losses).
        weight: ``w``, the weight of the distillation loss.
        teacher_dtype: the teacher's precision.
    """

    def __init__(
        self, student: Segmentor, loss: DistillLoss, teacher: nn.Module, weight: float, teacher_dtype: torch.dtype
    ) -> None:
        super().__init__(teacher, teacher_dtype)
        self.student = student
        self.loss = loss
        self.weight = weight
        self.on_features = loss_needs(loss).inputs == "features"
        if self.on_features:
            self.teacher_layers = teacher.resolve_layers(loss.teacher_layers)
            self.loss_layers = student.encoder.resolve_layers(loss.student_layers)
            self.all_layers = tuple(sorted(set(self.loss_layers) | set(student.layers)))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        distill_terms = self._feature_terms if self.on_features else self._logit_terms
        task, distill = distill_terms(images, labels)
        outputs = {f"distill_{k}": v.detach() for k, v in distill.items()}
        outputs.update({key: value for key, value in task.items() if key != "loss"})
        outputs["loss"] = task["loss"] + self.weight * distill["loss"]
        return outputs

    def _feature_terms(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Task and distillation losses of a feature loss, from one student pass."""
        with torch.no_grad():
            teacher_features = self.teacher(images.to(self.teacher_dtype), layers=self.teacher_layers)
        features = self.student.encode(images, layers=self.all_layers)
        task = segmentation_loss(self.student, select_layers(features, self.student.layers).maps(), labels)[1]
        loss_features = select_layers(features, self.loss_layers)
        if not self.student.normalised_taps:  # the decoder took raw tokens; losses compare normalised ones
            loss_features = self.student.encoder.normalise(loss_features)
        return task, self.loss(loss_features, teacher_features, self.student.encoder, images)

    def _logit_terms(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Task and distillation losses of a logit loss."""
        with torch.no_grad():
            teacher_logits = self.teacher(images.to(self.teacher_dtype)).float()
        logits, task = segmentation_loss(self.student, self.student.encode(images).maps(), labels)
        return task, self.loss(logits.float(), teacher_logits)
