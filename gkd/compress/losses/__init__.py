"""Registry of distillation losses: QSD (GKD's own) and every baseline, one file each.

``LOSSES`` maps a recipe name to its class; ``validate_loss_options`` checks and completes a recipe's
options; ``build_loss`` constructs the loss for given student/teacher widths.
"""

from __future__ import annotations

from typing import Any

import pydantic

from gkd.compress.losses.af_dcd import AfDCDLoss
from gkd.compress.losses.base import DistillLoss
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

__all__ = ["LOSSES", "DistillLoss", "build_loss", "loss_kind", "validate_loss_options"]


def _loss_class(name: str) -> type[DistillLoss]:
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def loss_kind(name: str) -> str:
    """``"feature"`` (encoder tokens) or ``"logit"`` (segmentation logits)."""
    return _loss_class(name).kind


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
    """The loss ``name`` with ``options`` for a student of width ``student_dim`` and a teacher of width
    ``teacher_dim`` (``num_classes``: the logits' class count, checked by logit losses)."""
    return _loss_class(name)(_options(name, options), student_dim, teacher_dim, num_classes)
