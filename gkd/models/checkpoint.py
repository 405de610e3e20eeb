"""Segmentor files: weights plus the architecture they belong to (safetensors metadata), loaded
strictly so a checkpoint of another architecture fails with the keys that do not match."""

from __future__ import annotations

from pathlib import Path

import torch

from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor
from gkd.models.zoo import ModelConfig, create_backbone_from_config
from gkd.utils.io import load_state_dict, save_state_dict


class CheckpointMismatchError(RuntimeError):
    """Weights that do not fit the architecture they are loaded into."""


def build_segmentor(model: ModelConfig, decoder: DecoderConfig, num_classes: int) -> Segmentor:
    """A segmentor with a freshly initialised decoder on the backbone ``model`` names."""
    encoder = create_backbone_from_config(model)
    head, layers = build_decoder(decoder, encoder.embed_dim, encoder.depth, num_classes)
    return Segmentor(encoder, head, layers)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``load_state_dict(strict=True)`` with shape checks, raising one error that lists every mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or misshaped:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "") or "none"

        raise CheckpointMismatchError(
            f"{source} does not fit the architecture: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; mis-shaped: {show(misshaped)}"
        )
    module.load_state_dict(state, strict=True)


def save_segmentor(
    path: str | Path, segmentor: Segmentor, model: ModelConfig, decoder: DecoderConfig, num_classes: int
) -> None:
    metadata = {
        "format": "gkd.segmentor/1",
        "model": model.model_dump(mode="json", include=set(ModelConfig.model_fields) - {"weights"}),
        "decoder": decoder.model_dump(mode="json"),
        "num_classes": num_classes,
    }
    save_state_dict(path, segmentor.state_dict(), metadata)


def load_segmentor(path: str | Path) -> tuple[Segmentor, dict]:
    """Rebuild the architecture recorded in ``path`` and load its weights strictly."""
    state, metadata = load_state_dict(path)
    if metadata.get("format") != "gkd.segmentor/1":
        raise CheckpointMismatchError(f"{path} is not a gkd segmentor file (no gkd.segmentor metadata)")
    model = ModelConfig.model_validate(metadata["model"])
    segmentor = build_segmentor(model, DecoderConfig.model_validate(metadata["decoder"]), metadata["num_classes"])
    load_strict(segmentor, state, path)
    return segmentor, metadata
