"""Contract tests of the decoder registry (as smp's tests/models/base.py for its decoders): every decoder any
recipe can name builds from its recipe block, takes any input size, and exports to ONNX with parity."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from gkd.export.onnx import export_onnx, onnx_session, prepare_for_export
from gkd.models.backbone import Backbone
from gkd.models.decoders import DECODERS, DecoderConfig, DecoderName, build_decoder
from gkd.models.segmentor import Segmentor

NUM_CLASSES = 5
DECODER_OPTIONS = {  # tiny versions; mask2former's GroupNorm(32) needs 32 channels
    "mask2former": {"channels": 32, "queries": 8, "pixel_decoder_layers": 1, "decoder_layers": 2, "points": 64}
}


def test_the_registry_is_the_recipe_schema():
    assert set(DECODERS) == set(get_args(DecoderName))
    for name, spec in DECODERS.items():
        for depth in (4, 12, 24):
            taps = spec.default_layers(depth)
            assert taps and all(0 <= tap < depth for tap in taps), (name, depth, taps)
            assert spec.num_layers in (None, len(taps)), (name, depth, taps)


def _segmentor(name: str) -> Segmentor:
    torch.manual_seed(0)
    kwargs = {"dynamic_img_size": True, "img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 2}
    backbone = Backbone("tiny", "vit_small_patch16_224", kwargs)
    config = DecoderConfig(name=name, **{"channels": 16, **DECODER_OPTIONS.get(name, {})})
    return Segmentor(backbone, *build_decoder(config, 32, 4, NUM_CLASSES)).eval()


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_every_decoder_takes_any_input_size(name):
    segmentor = _segmentor(name)
    for size in ((64, 64), (48, 80), (50, 70)):  # square, wide, and not a multiple of the patch
        with torch.no_grad():
            logits = segmentor(torch.rand(2, 3, *size))
        assert logits.shape == (2, NUM_CLASSES, *size) and torch.isfinite(logits).all(), (name, size)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_every_decoder_exports_to_onnx_with_parity(name, tmp_path):
    segmentor, size = _segmentor(name), (48, 64)
    path = tmp_path / "model.onnx"
    export_onnx(prepare_for_export(segmentor, size), path, size, opset=18, batch_range=(1, 2, 4))
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected = segmentor(images).numpy()
    np.testing.assert_allclose(onnx_session(path).run(None, {"images": images.numpy()})[0], expected, atol=1e-4)
