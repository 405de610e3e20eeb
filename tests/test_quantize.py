"""int8 quantization: the calibration set's size, the calibration methods, and the sensitivity fallback on a
hand-built graph where two nodes ruin per-tensor int8 (an outlier channel) and every other node is harmless."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from gkd.export.config import ExportConfig, Int8FallbackConfig, ParityConfig
from gkd.export.onnx import INPUT_NAME, OUTPUT_NAME, onnx_session
from gkd.export.quantize import (
    excluded_nodes,
    quantizable_nodes,
    quantize_int8,
    quantize_with_fallback,
    split_calibration,
)
from gkd.export.stage import export_artifacts
from gkd.models.backbone import Backbone
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor

OUTLIER = 1000.0  # channel 0 of conv1's output is this much larger than the other channels
TOLERANCE = ParityConfig().int8
SIZE = (32, 48)


def _conv(name: str, source: str, weight: np.ndarray) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    node = helper.make_node("Conv", [source, f"{name}.w"], [name], name=name, pads=[1, 1, 1, 1])
    return node, numpy_helper.from_array(weight.astype(np.float32), f"{name}.w")


def outlier_graph(path: Path) -> Path:
    """Five 3x3 convolutions (3 -> 8 -> 8 -> 8 -> 8 -> 4 classes). conv1 makes channel 0 `OUTLIER` times
    larger and conv2 scales it back: fp32 is unchanged, but one per-tensor int8 scale for conv1's output
    (= conv2's input) rounds the seven ordinary channels to zero. conv0 and conv4 are first / last (always
    float), so conv1, conv2 and conv3 are quantizable and only conv1 and conv2 hurt."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.3, shape) for shape in ((8, 3, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3))]
    weights.append(rng.normal(0, 0.3, (4, 8, 3, 3)))
    weights[1][0] *= OUTLIER
    weights[2][:, 0] /= OUTLIER
    nodes, initializers, source = [], [], INPUT_NAME
    for index, weight in enumerate(weights):
        node, initializer = _conv(f"conv{index}", source, weight)
        nodes.append(node)
        initializers.append(initializer)
        source = node.output[0]
    nodes.append(helper.make_node("Identity", [source], [OUTPUT_NAME], name="logits"))
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 4, 16, 16])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _agreement(fp32_path: Path, int8_path: Path, images: torch.Tensor) -> float:
    feed = {INPUT_NAME: images.numpy()}
    reference = onnx_session(fp32_path).run(None, feed)[0]
    return float((onnx_session(int8_path).run(None, feed)[0].argmax(1) == reference.argmax(1)).mean())


def test_calibration_needs_its_count_and_the_holdout_is_disjoint():
    images = torch.arange(10.0).view(10, 1, 1, 1)
    calibration, holdout = split_calibration(images, 6, 3)
    assert calibration.flatten().tolist() == [0, 1, 2, 3, 4, 5] and holdout.flatten().tolist() == [6, 7, 8]
    assert split_calibration(images, 8, 32)[1].flatten().tolist() == [8, 9]  # the holdout takes what is left
    with pytest.raises(ValueError, match="needs 12 source images, the source split has 10"):
        split_calibration(images, 12, 0)
    config = ExportConfig()
    assert config.calibration_images >= 256 and config.source_images == config.calibration_images + 32
    assert ExportConfig(int8_fallback={"enabled": False}).source_images == config.calibration_images


def test_calibration_method_is_a_recipe_key_and_changes_the_ranges(tmp_path):
    assert ExportConfig(calibration_method="entropy").calibration_method == "entropy"
    with pytest.raises(ValidationError):
        ExportConfig(calibration_method="kl")
    fp32 = outlier_graph(tmp_path / "model.onnx")
    images = _images(8, 0)
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        path = tmp_path / f"{method}.onnx"
        info = quantize_int8(fp32, path, images, method)
        assert info["calibration_method"] == method and info["calibration_images"] == 8
        initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        scales[method] = initializers["conv2_scale"]  # conv2's input (conv1's output) activation scale
    # min/max covers every value; percentile (99.999 % of |x|) clips the largest, entropy never widens the range
    assert scales["minmax"] > scales["percentile"] and scales["minmax"] >= scales["entropy"]
    with pytest.raises(ValueError, match="unknown calibration method"):
        quantize_int8(fp32, tmp_path / "x.onnx", images, "kl")


def test_fallback_keeps_the_harmful_nodes_float_and_recovers_agreement(tmp_path):
    fp32 = outlier_graph(tmp_path / "model.onnx")
    model = onnx.load(str(fp32))
    assert excluded_nodes(model) == ["conv0", "conv4"] and quantizable_nodes(model) == ["conv1", "conv2", "conv3"]
    calibration, holdout, unseen = _images(16, 0), _images(8, 1), _images(8, 2)

    plain = quantize_int8(fp32, tmp_path / "plain.onnx", calibration)
    assert _agreement(fp32, tmp_path / "plain.onnx", unseen) < TOLERANCE.min_argmax_agreement  # int8 alone fails
    assert plain["excluded_nodes"] == ["conv0", "conv4"]

    out = tmp_path / "model.int8.onnx"
    info = quantize_with_fallback(fp32, out, calibration, holdout, TOLERANCE, Int8FallbackConfig(max_float_nodes=3))
    fallback = info["fallback"]
    assert fallback["ran"] and not fallback["before"]["passed"] and fallback["passed"]
    float_nodes = [entry["node"] for entry in fallback["float_nodes"]]
    assert sorted(float_nodes) == ["conv1", "conv2"]  # the harmless conv3 stays int8
    assert info["excluded_nodes"] == ["conv0", "conv4", *float_nodes]  # the summary names every float node
    assert all("quantized alone" in entry["why"] for entry in fallback["float_nodes"])
    assert fallback["sensitivity"]["conv3"]["argmax_agreement"] > fallback["sensitivity"]["conv2"]["argmax_agreement"]
    assert _agreement(fp32, out, unseen) > max(
        TOLERANCE.min_argmax_agreement, _agreement(fp32, tmp_path / "plain.onnx", unseen)
    )
    graph = onnx.load(str(out)).graph
    producer = {output: node.op_type for node in graph.node for output in node.output}
    inputs = {node.name: node.input for node in graph.node if node.op_type == "Conv"}
    assert producer[inputs["conv3"][0]] == producer[inputs["conv3"][1]] == "DequantizeLinear"  # still int8
    assert producer[inputs["conv2"][0]] == "Conv" and inputs["conv2"][1] == "conv2.w"  # float


def test_fallback_cap_is_reported_when_the_tolerance_is_not_reached(tmp_path):
    fp32 = outlier_graph(tmp_path / "model.onnx")
    out = tmp_path / "model.int8.onnx"
    info = quantize_with_fallback(
        fp32, out, _images(16, 0), _images(8, 1), TOLERANCE, Int8FallbackConfig(max_float_nodes=1)
    )
    fallback = info["fallback"]
    assert fallback["ran"] and not fallback["passed"] and len(fallback["float_nodes"]) == 1
    assert "max_float_nodes" in fallback["reason"]
    assert out.is_file() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("gkd.int8.*"))


def _tiny_segmentor() -> Segmentor:
    torch.manual_seed(0)
    kwargs = {"dynamic_img_size": True, "img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 2}
    backbone = Backbone("tiny", "vit_small_patch16_224", kwargs, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return Segmentor(backbone, *build_decoder(DecoderConfig(name="uper", channels=16), 32, 4, 5)).eval()


def test_export_stage_records_the_fallback_and_a_too_small_source(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    segmentor, images = _tiny_segmentor(), torch.rand(12, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    config = ExportConfig(precisions=("int8",), aoti=False, calibration_images=8, int8_fallback={"holdout_images": 4})
    summary = export_artifacts(segmentor, SIZE, tmp_path / "ok", config, images, images[:2], torch.device("cpu"))
    int8 = summary["artifacts"]["onnx/int8"]
    assert int8["calibration_images"] == 8 and int8["fallback"]["holdout_images"] == 4
    assert int8["excluded_nodes"][:2] == excluded_nodes(onnx.load(str(tmp_path / "ok" / "model.onnx")))

    small = export_artifacts(segmentor, SIZE, tmp_path / "small", config, images[:6], images[:2], torch.device("cpu"))
    assert "needs 8 source images, the source split has 6" in small["failed"]["onnx/int8"]
    assert not (tmp_path / "small" / "model.int8.onnx").exists()


def test_default_int8_graph_keeps_the_attention_matmuls_float(tmp_path):
    """The attention products (q.kT and attn.v: MatMuls whose two operands are activations, two per block) stay
    float in the default int8 graph in both formats (ONNX Runtime's QDQ quantizer ignores ``MatMulConstBOnly``,
    so `quantize_int8` excludes them by name), every MatMul with a weight takes DequantizeLinear inputs; with
    ``op_types=None`` they are quantized too. The summary's ``attention_matmuls`` says which."""
    from gkd.export.onnx import export_onnx, prepare_for_export
    from gkd.export.quantize import activation_matmuls
    from tests.helpers.tiny_models import tiny_segmentor

    torch.set_num_threads(1)
    size = (32, 32)
    fp32 = tmp_path / "model.onnx"
    export_onnx(prepare_for_export(tiny_segmentor(depth=4), size).eval(), fp32, size, 18, (1, 2, 4))
    graph = onnx.load(str(fp32)).graph
    weights = {initializer.name for initializer in graph.initializer}
    matmuls = {node.name for node in graph.node if node.op_type == "MatMul"}
    attention = {node.name for node in graph.node if node.op_type == "MatMul" and not set(node.input[:2]) & weights}
    assert len(attention) == 2 * 4 and len(matmuls) > len(attention)  # q.kT and attn.v of each of the 4 blocks
    assert set(activation_matmuls(onnx.load(str(fp32)))) == attention
    images = torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(0))

    def quantized_matmuls(path):
        int8 = onnx.load(str(path)).graph
        producer = {output: node.op_type for node in int8.node for output in node.output}
        return {
            node.name
            for node in int8.node
            if node.op_type == "MatMul" and {producer.get(name) for name in node.input[:2]} == {"DequantizeLinear"}
        }

    info = quantize_int8(fp32, tmp_path / "qdq.onnx", images)  # the pipeline's default
    assert info["format"] == "QDQ" and info["attention_matmuls"] == "float"
    assert quantized_matmuls(tmp_path / "qdq.onnx") == matmuls - attention

    info = quantize_int8(fp32, tmp_path / "qop.onnx", images, quant_format="QOperator")
    still_float = {node.name for node in onnx.load(str(tmp_path / "qop.onnx")).graph.node if node.op_type == "MatMul"}
    assert info["attention_matmuls"] == "float" and still_float == attention  # the weighted ones: QLinearMatMul

    info = quantize_int8(fp32, tmp_path / "all.onnx", images, op_types=None)
    assert info["attention_matmuls"] == "int8" and quantized_matmuls(tmp_path / "all.onnx") == matmuls
