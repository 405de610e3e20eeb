"""Registry of distillation losses: QSD (GKD's own) and every baseline, one file each.

``LOSSES`` maps a recipe name to its class; ``loss_needs`` says what a loss consumes (features or
logits; a teacher encoder or a trained teacher segmentor); ``validate_loss_options`` checks and completes
a recipe's options; ``build_loss`` constructs the loss for given student/teacher widths.
"""

from __future__ import annotations

from typing import Any

import pydantic

from gkd.compress.losses.af_dcd import AfDCDLoss
from gkd.compress.losses.base import DistillLoss, LossNeeds
from gkd.compress.losses.cwd import CWDLogitsLoss, CWDLoss
from gkd.compress.losses.g2sd import G2SDLoss
from gkd.compress.losses.mse import MSELoss
from gkd.compress.losses.proteus import ProteusLoss
from gkd.compress.losses.qsd import QSDLoss
from gkd.compress.losses.vanilla_kd import VanillaKDLoss
from gkd.compress.losses.vitkd import ViTKDLoss

LOSSES: dict[str, type[DistillLoss]] = {
    "qsd": QSDLoss,
    "mse": MSELoss,
    "vanilla_kd": VanillaKDLoss,
    "cwd": CWDLoss,
    "cwd_logits": CWDLogitsLoss,
    "af_dcd": AfDCDLoss,
    "g2sd": G2SDLoss,
    "vitkd": ViTKDLoss,
    "proteus": ProteusLoss,
}

__all__ = ["LOSSES", "DistillLoss", "LossNeeds", "build_loss", "loss_needs", "validate_loss_options"]


def _loss_class(name: str) -> type[DistillLoss]:
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def loss_needs(loss: str | DistillLoss) -> LossNeeds:
    """What the loss named ``loss`` (a recipe name, or a built loss) consumes: the one place recipe
    validation, the pipeline and the objectives learn it."""
    return loss.needs if isinstance(loss, DistillLoss) else _loss_class(loss).needs


def _options(name: str, options: dict[str, Any]) -> DistillLoss.Options:
    try:
        return _loss_class(name).Options(**options)
    except pydantic.ValidationError as error:
        raise ValueError(f"options of loss {name!r}: {error}") from error


def validate_loss_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options completed with their defaults (JSON types), or a ``ValueError`` naming the bad key."""
    return _options(name, options).model_dump(mode="json")


def build_loss(
    name: str, options: dict[str, Any], student_dim: int, teacher_dim: int, num_classes: int | None = None
) -> DistillLoss:
    """The loss ``name`` built for given network widths.

    Args:
        name: a key of ``LOSSES``.
        options: its recipe options (validated here; defaults fill the missing ones).
        student_dim: the student's token width.
        teacher_dim: the teacher's token width.
        num_classes: the logits' class count, checked by logit losses.
    """
    return _loss_class(name)(_options(name, options), student_dim, teacher_dim, num_classes)
