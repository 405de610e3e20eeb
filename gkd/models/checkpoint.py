"""Segmentor files: weights plus the architecture they belong to (safetensors metadata), loaded
strictly (`check_fit`) so a checkpoint of another architecture fails with the keys that do not match."""

from __future__ import annotations

from pathlib import Path

from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor
from gkd.models.weights import WeightsMismatchError, check_fit
from gkd.models.zoo import ModelConfig, create_backbone_from_config
from gkd.utils.io import load_state_dict, save_state_dict


def build_segmentor(model: ModelConfig, decoder: DecoderConfig, num_classes: int) -> Segmentor:
    """A segmentor with a freshly initialised decoder on the backbone ``model`` names."""
    encoder = create_backbone_from_config(model)
    head, layers = build_decoder(decoder, encoder.embed_dim, encoder.depth, num_classes)
    return Segmentor(encoder, head, layers)


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
        raise WeightsMismatchError(f"{path} is not a gkd segmentor file (no gkd.segmentor metadata)")
    model = ModelConfig.model_validate(metadata["model"])
    segmentor = build_segmentor(model, DecoderConfig.model_validate(metadata["decoder"]), metadata["num_classes"])
    check_fit(segmentor, state, path)
    segmentor.load_state_dict(state, strict=True)
    return segmentor, metadata
