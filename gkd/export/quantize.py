"""int8 ONNX by explicit quantization: ONNX Runtime's static quantizer in QDQ format, calibrated on source images.

Choices for ViT segmentors (each also what TensorRT's explicit-quantization path expects):

- Symmetric signed int8 for weights and activations (zero point 0): TensorRT only takes symmetric int8 Q/DQ.
- Weights per output channel (Conv axis 0, ConvTranspose axis 1, MatMul axis 1): ViT projection weights
  differ in range by orders of magnitude between channels; per-tensor scales would flush the small ones.
- Quantized ops: MatMul with a constant weight (every qkv / proj / MLP linear) and (transposed) convolutions;
  that is where the FLOPs are. The attention MatMuls (q.kT, attn.v) stay float (``MatMulConstBOnly``):
  softmax probabilities in [0, 1] keep only 7 bits in symmetric int8. LayerNorm, Softmax, GELU, residual
  Adds and Resizes are not quantized.
- Excluded nodes: the first convolution (the patch embedding, fed with normalised pixels) and the last one
  (the classifier that produces the logits): the usual first/last-layer rule, a small share of the FLOPs.
- Biases stay float (``QuantizeBias=False``): TensorRT adds them in its fp32 epilogue, it has no int32 bias DQ.
- Calibration: min/max over the calibration images by default (``percentile`` / ``entropy`` selectable).
- No ``quant_pre_process``: the exporter's optimizer already folded BatchNorm and constants into the graph.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from gkd.export.onnx import INPUT_NAME
from gkd.utils.io import atomic_path

QUANTIZED_OPS = ("MatMul", "Conv", "ConvTranspose")


def excluded_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the first and last convolution in topological order (patch embedding and classifier)."""
    convolutions = [node.name for node in model.graph.node if node.op_type == "Conv"]
    return list(dict.fromkeys([convolutions[0], convolutions[-1]])) if convolutions else []


def _reader(images: torch.Tensor, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        """Feeds calibration images in batches (the graph's batch is dynamic)."""

        def __init__(self) -> None:
            array = images.float().cpu().numpy().astype(np.float32)
            self.batches = iter([array[i : i + batch_size] for i in range(0, len(array), batch_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    return ImageReader()


# Our names -> onnxruntime.quantization.CalibrationMethod members (imported lazily, with onnxruntime).
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
_QDQ_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "MatMulConstBOnly": True,
    "QuantizeBias": False,
    # No "CalibMaxIntermediateOutputs": in onnxruntime 1.32 the min/max calibrator drops each full
    # chunk without merging it, so calibration keeps every batch's activations in memory.
}


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: torch.Tensor,
    method: str = "minmax",
    batch_size: int = 4,
) -> dict:
    """Write the QDQ int8 model of ``fp32_path`` to ``out_path`` (atomically) and describe what was done.

    Args:
        fp32_path: the fp32 ONNX graph.
        out_path: the int8 graph to write.
        calibration_images: ``(N, 3, H, W)`` images in ``[0, 1]`` the activation ranges are calibrated on.
        method: ONNX Runtime's calibration: ``minmax``, ``entropy`` or ``percentile``.
        batch_size: calibration images per run.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out_path = Path(out_path)
    model = onnx.load(str(fp32_path))
    exclude = excluded_nodes(model)
    start = time.perf_counter()
    with atomic_path(out_path) as temp:
        quantize_static(
            model,
            str(temp),
            _reader(calibration_images, batch_size),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
            extra_options=_QDQ_OPTIONS,
        )
        onnx.checker.check_model(str(temp))
        ops = Counter(node.op_type for node in onnx.load(str(temp)).graph.node)
    return {
        "file": out_path.name,
        "bytes": out_path.stat().st_size,
        "quantize_s": round(time.perf_counter() - start, 2),
        "format": "QDQ",
        "calibration_images": len(calibration_images),
        "calibration_method": method,
        "activations": "int8 symmetric, per tensor",
        "weights": "int8 symmetric, per output channel",
        "quantized_ops": list(QUANTIZED_OPS),
        "attention_matmuls": "float (MatMulConstBOnly)",
        "excluded_nodes": exclude,
        "quantize_linear_nodes": ops["QuantizeLinear"],
        "dequantize_linear_nodes": ops["DequantizeLinear"],
    }
