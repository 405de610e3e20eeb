"""Resolve a model name to a `Backbone`: any timm ViT name, built with ``dynamic_img_size``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm

from gkd.models.backbone import Backbone


def create_backbone(name: str, weights: str | Path | None = None, **model_kwargs: Any) -> Backbone:
    """Build ``name`` (a timm ViT) with random init, or strictly load ``weights`` (timm layout)."""
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights for {name}: {weights} not found")
    kwargs = {"dynamic_img_size": True, "num_classes": 0, **model_kwargs}
    model = timm.create_model(name, pretrained=False, checkpoint_path=str(weights) if weights else "", **kwargs)
    config = model.pretrained_cfg
    return Backbone(model, name, config.get("mean", (0.485, 0.456, 0.406)), config.get("std", (0.229, 0.224, 0.225)))
