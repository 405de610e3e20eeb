"""Quantization-aware distillation (QAD): the exported student fake-quantized as its int8 graph computes
(`gkd.export.qdq_mirror`), fine-tuned on ``task_weight * L_task + distill_weight * L_distill``: the task
cross-entropy on labelled source images and the stage-1 distillation loss (``distill.loss``) between the
student's encoder tokens and the frozen teacher's, as `JointObjective` computes them. BatchNorm statistics
stay frozen (the int8 graph folds them into the convolutions); the trained weights are then quantized by ONNX
Runtime with the PTQ calibration ranges (`gkd.export.int8_qad`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gkd.compress.config import OptimConfig
from gkd.compress.losses import DistillLoss, loss_needs
from gkd.compress.objectives import WithFrozenTeacher, freeze, segmentation_loss, select_layers
from gkd.export.config import Int8Config
from gkd.export.qdq_mirror import LearnedScales, QuantPlan, fake_quantized
from gkd.models.backbone import Backbone
from gkd.models.segmentor import Segmentor

QAD_PHASE = "qad"


class QADObjective(WithFrozenTeacher):
    """``self_distill_weight * L_self + task_weight * L_task + distill_weight * L_distill`` on one student pass
    (a feature loss). ``L_self`` is the per-pixel KL divergence of the student's class softmax from the fp32
    student's (a frozen copy taken here, before fake quantization), times ``temperature**2``. The student stays in
    eval mode (frozen BatchNorm statistics, no dropout) while it trains.

    ``L_distill`` compares the student's encoder tokens with the frozen teacher's, as `JointObjective` does; with
    ``config.distill_weight`` 0 (the default) there is no such term, and ``loss`` and ``teacher`` may be None.
    """

    def __init__(
        self,
        student: Segmentor,
        loss: DistillLoss | None,
        teacher: Backbone | None,
        config: Int8Config,
        teacher_dtype: torch.dtype,
    ) -> None:
        weight = config.distill_weight
        if weight and (loss is None or teacher is None):
            raise ValueError("QAD with export.int8.distill_weight > 0 needs the stage-1 loss and the teacher")
        super().__init__(teacher if weight else None, teacher_dtype)
        self.student = student
        self.weight = weight
        self.task_weight = config.task_weight
        self.self_distill_weight = config.self_distill_weight
        self.temperature = config.temperature
        self.loss, self.all_layers = None, tuple(student.layers)
        if self.weight:  # the stage-1 term: the loss (its heads train) against the frozen teacher
            if loss_needs(loss).inputs != "features":
                raise ValueError(
                    f"QAD distils encoder tokens; {type(loss).__name__} compares {loss_needs(loss).inputs}"
                )
            self.loss = loss
            self.teacher_layers = teacher.resolve_layers(loss.teacher_layers)
            self.loss_layers = student.encoder.resolve_layers(loss.student_layers)
            self.all_layers = tuple(sorted(set(self.loss_layers) | set(student.layers)))
        self._fp32 = (freeze(copy.deepcopy(student)),)  # outside the module tree: never trained or checkpointed

    def train(self, mode: bool = True) -> QADObjective:
        super().train(mode)
        self.student.eval()
        return self

    def self_distillation(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``L_self``: KL(fp32 student || student) of the per-pixel class softmax at ``temperature``."""
        fp32 = self._fp32[0]
        with torch.no_grad():
            reference = fp32.decode(fp32.encode(images).maps(), logits.shape[-2:]).float()
        t = self.temperature
        log_student = F.log_softmax(logits.float() / t, dim=1)
        log_reference = F.log_softmax(reference / t, dim=1)
        kl = (log_reference.exp() * (log_reference - log_student)).sum(dim=1)
        return kl.mean() * t**2

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        features = self.student.encode(images, layers=self.all_layers)
        logits, task = segmentation_loss(self.student, select_layers(features, self.student.layers).maps(), labels)
        self_term = self.self_distillation(logits, images)
        outputs = {"loss_ce": task["loss"].detach(), "loss_self": self_term.detach()}
        loss = self.self_distill_weight * self_term + self.task_weight * task["loss"]
        if self.weight:  # the stage-1 loss against the frozen teacher
            with torch.no_grad():
                teacher_features = self.teacher(images.to(self.teacher_dtype), layers=self.teacher_layers)
            loss_features = select_layers(features, self.loss_layers)
            if not self.student.normalised_taps:  # the decoder took raw tokens; losses compare normalised ones
                loss_features = self.student.encoder.normalise(loss_features)
            distill = self.loss(loss_features, teacher_features, self.student.encoder, images)
            outputs.update({f"distill_{k}": v.detach() for k, v in distill.items()})
            loss = loss + self.weight * distill["loss"]
        outputs["loss"] = loss
        return outputs


def qad_optim(config: Int8Config) -> OptimConfig:
    """The fine-tune's optimisation: AdamW at ``config.lr``, cosine decay, no weight decay or warm-up."""
    return OptimConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=0.0,
        checkpoint_every=min(config.steps, 50),
        log_every=min(config.steps, 10),
    )


def _losses(objective: QADObjective, batch: dict) -> dict[str, float]:
    """The objective's terms on ``batch``, without gradients (the loss heads' masks seeded)."""
    objective.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        outputs = objective(batch)
    keys = ("loss", "loss_self", "loss_ce", "distill_loss")
    return {key: round(float(outputs[key]), 6) for key in keys if key in outputs}


def train_qad(
    objective: QADObjective,
    plan: QuantPlan,
    fit: Callable[[nn.Module, OptimConfig], dict],
    probe: dict,
    config: Int8Config,
) -> dict:
    """Fine-tune ``objective.student`` fake-quantized by ``plan``; its weights stay the trained fp32 ones.

    Args:
        objective: the QAD objective around the (prepared, fixed-size) student.
        plan: its fake-quant points (`gkd.export.qdq_mirror.quant_plan`).
        fit: trains an objective with an optimisation config (a resumable `Trainer`), returns its last metrics.
        probe: a fixed labelled batch the losses are measured on before and after.
        config: the recipe's ``export.int8``.

    Returns:
        The losses on ``probe`` at the start and the end, the trainer's last logged metrics and, with
        ``config.learn_scales``, the learned scale of every quantized activation (``activation_scales``).
    """
    device = next(objective.student.parameters()).device
    probe = {key: value.to(device) for key, value in probe.items()}
    learned = None
    if config.learn_scales:  # a submodule of the objective: trained and checkpointed with it
        objective.scales = learned = LearnedScales(plan.scales, config.scale_rate).to(device)
    with fake_quantized(objective.student, plan, learned):
        start = _losses(objective, probe)
        last = fit(objective, qad_optim(config))
        end = _losses(objective, probe)
    objective.student.eval()
    record = {
        "steps": config.steps,
        "losses_start": start,
        "losses_end": end,
        "last_logged": {k: round(float(v), 6) for k, v in last.items()},
    }
    if learned is not None:
        record["activation_scales"] = learned.values()
    return record
