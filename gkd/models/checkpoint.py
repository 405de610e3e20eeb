"""Encoder and segmentor files: weights plus the architecture they belong to (safetensors metadata), loaded
strictly (`check_fit`) so a checkpoint of another architecture fails with the keys that do not match."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gkd.models.backbone import Backbone
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor
from gkd.models.weights import WeightsMismatchError, check_fit
from gkd.models.zoo import ModelConfig, create_backbone_from_config
from gkd.utils.io import load_state_dict, save_state_dict

ENCODER_FORMAT = "gkd.encoder/1"
SEGMENTOR_FORMAT = "gkd.segmentor/1"


def build_segmentor(model: ModelConfig, decoder: DecoderConfig, num_classes: int) -> Segmentor:
    """A segmentor with a freshly initialised decoder on the backbone ``model`` names."""
    encoder = create_backbone_from_config(model)
    head, layers = build_decoder(decoder, encoder.embed_dim, encoder.depth, num_classes)
    return Segmentor(encoder, head, layers)


def save_segmentor(
    path: str | Path, segmentor: Segmentor, model: ModelConfig, decoder: DecoderConfig, num_classes: int
) -> None:
    """Write ``segmentor``'s weights (safetensors, atomically) with the architecture `load_segmentor` rebuilds.

    Args:
        path: the file to write.
        segmentor: the trained model.
        model: its encoder's config (recorded without the weights path: the file holds the weights).
        decoder: its decoder's config.
        num_classes: classes of its output.
    """
    metadata = {
        "format": SEGMENTOR_FORMAT,
        "model": model.model_dump(mode="json", include=set(ModelConfig.model_fields) - {"weights"}),
        "decoder": decoder.model_dump(mode="json"),
        "num_classes": num_classes,
    }
    save_state_dict(path, segmentor.state_dict(), metadata)


def load_segmentor(path: str | Path) -> tuple[Segmentor, dict]:
    """Rebuild the architecture recorded in ``path`` and load its weights strictly."""
    state, metadata = load_state_dict(path)
    if metadata.get("format") != SEGMENTOR_FORMAT:
        raise WeightsMismatchError(f"{path} is not a gkd segmentor file (no gkd.segmentor metadata)")
    model = ModelConfig.model_validate(metadata["model"])
    segmentor = build_segmentor(model, DecoderConfig.model_validate(metadata["decoder"]), metadata["num_classes"])
    check_fit(segmentor, state, path)
    segmentor.load_state_dict(state, strict=True)
    return segmentor, metadata


def save_encoder(backbone: Backbone, path: str | Path, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``backbone.model.state_dict()`` (plain timm keys) as safetensors, atomically, with the timm
    architecture and kwargs in the metadata: ``timm.create_model(meta['arch'], **meta['timm_kwargs'])`` takes
    it back. ``metadata`` adds JSON entries (e.g. the recipe's model config)."""
    metadata = {
        **(metadata or {}),
        "format": ENCODER_FORMAT,
        "name": backbone.name,
        "arch": backbone.timm_arch,
        "timm_kwargs": backbone.timm_kwargs,
        "mean": backbone.mean.flatten().tolist(),
        "std": backbone.std.flatten().tolist(),
    }
    save_state_dict(path, backbone.model.state_dict(), metadata)


def load_encoder(path: str | Path) -> Backbone:
    """The `Backbone` a `save_encoder` file describes, weights loaded strictly. The global random state is left
    as it was (the throw-away random initialisation draws from a forked one), so loading changes no seeded run."""
    state, metadata = load_state_dict(path)
    if metadata.get("format") != ENCODER_FORMAT:
        raise WeightsMismatchError(f"{path} is not a gkd encoder file (no {ENCODER_FORMAT} metadata)")
    with torch.random.fork_rng(devices=[]):
        backbone = Backbone(
            metadata["name"], metadata["arch"], metadata["timm_kwargs"], metadata["mean"], metadata["std"]
        )
    check_fit(backbone.model, state, path)
    backbone.model.load_state_dict(state, strict=True)
    return backbone
