"""int8 ONNX by explicit quantization: ONNX Runtime's static quantizer in QDQ format, calibrated on source images.

Choices for ViT segmentors (each also what TensorRT's explicit-quantization path expects):

- Symmetric signed int8 for weights and activations (zero point 0): TensorRT only takes symmetric int8 Q/DQ.
- Weights per output channel (Conv axis 0, ConvTranspose axis 1, MatMul axis 1): ViT projection weights
  differ in range by orders of magnitude between channels; per-tensor scales would flush the small ones.
- Quantized ops: MatMul with a constant weight (every qkv / proj / MLP linear) and (transposed) convolutions;
  that is where the FLOPs are. The attention products (q.kT and attn.v, MatMuls whose two operands are
  activations: `activation_matmuls`) stay float: the softmax probabilities in [0, 1] keep 7 bits in symmetric
  int8, and on a 2-core AVX-512 CPU the QDQ graph that quantizes them ran ViT-S/16 + UPerNet at 512 1.26x
  faster than fp32 against 1.52x with them float (batch 1; ONNX Runtime fuses them with the softmax into
  QLinearSoftmax, about 6x the float softmax's time: `benchmarks/int8_speed_cpu/`). ONNX Runtime's
  ``MatMulConstBOnly`` does this only in its QOperator quantizer (``QOpMatMul.should_quantize``); its QDQ
  MatMul quantizes every input, so `quantize_int8` excludes them by name. ``op_types=None`` quantizes every op
  ONNX Runtime handles, attention included. LayerNorm, Softmax, GELU, residual Adds and Resizes compute in float.
- Excluded nodes: the first convolution (the patch embedding, fed with normalised pixels) and the last one
  (the classifier that produces the logits): the usual first/last-layer rule, a small share of the FLOPs.
- Biases stay float (``QuantizeBias=False``): TensorRT adds them in its fp32 epilogue, it has no int32 bias DQ.
- Calibration: min/max over the calibration images by default (``percentile`` / ``entropy`` selectable),
  run once per artifact and kept in ONNX Runtime's calibration cache, so re-quantizing with other exclusions
  (the sensitivity fallback) reuses the same activation ranges.
- Sensitivity fallback (`quantize_with_fallback`): when the int8 graph misses its parity tolerance on held-out
  source images, each candidate node (`quantizable_nodes`) is quantized alone to measure what it costs, and the
  most harmful ones stay float, one at a time, until the tolerance holds or the cap on float nodes is reached.
- No ``quant_pre_process``: the exporter's optimizer already folded BatchNorm and constants into the graph.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from gkd.export.config import Int8FallbackConfig
from gkd.export.onnx import INPUT_NAME, OUTPUT_NAME, onnx_session
from gkd.export.parity import compare_logits, judge
from gkd.export.precisions import ParityTolerance
from gkd.utils.io import atomic_path

QUANTIZED_OPS = ("MatMul", "Conv", "ConvTranspose")
# Our names -> onnxruntime.quantization.CalibrationMethod members (imported lazily, with onnxruntime).
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
_QDQ_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "MatMulConstBOnly": True,  # read by the QOperator format only; `quantize_int8` excludes them by name
    "QuantizeBias": False,
}
# Calibration batches per collect pass: ONNX Runtime's calibrators keep every activation of a pass in memory
# (256 images at 384x288 would be tens of GB); ``CalibStridedMinMax`` splits the passes and merges their
# ranges (min/max) or histograms (entropy, percentile).
_BATCHES_PER_PASS = 4


def excluded_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the first and last convolution in topological order (patch embedding and classifier)."""
    convolutions = [node.name for node in model.graph.node if node.op_type == "Conv"]
    return list(dict.fromkeys([convolutions[0], convolutions[-1]])) if convolutions else []


def constant_names(model: onnx.ModelProto) -> set[str]:
    """Names of the graph's constant tensors: its initializers and the outputs of its Constant nodes."""
    constants = {initializer.name for initializer in model.graph.initializer}
    return constants | {node.output[0] for node in model.graph.node if node.op_type == "Constant"}


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls whose two operands are activations (the attention products q.kT and attn.v)."""
    constants = constant_names(model)
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and not constants & set(node.input)]


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """The sensitivity fallback's candidates: convolutions and MatMuls with a constant weight, less
    `excluded_nodes`."""
    weights = constant_names(model)
    always_float = set(excluded_nodes(model))
    return [
        node.name
        for node in model.graph.node
        if node.op_type in QUANTIZED_OPS
        and (node.op_type != "MatMul" or node.input[1] in weights)
        and node.name not in always_float
    ]


def split_calibration(images: torch.Tensor, calibration: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``calibration`` images and up to ``holdout`` of the rest (the fallback's held-out set).

    Raises:
        ValueError: fewer than ``calibration`` images (the source split is too small for the recipe).
    """
    if len(images) < calibration:
        raise ValueError(
            f"int8 calibration needs {calibration} source images, the source split has {len(images)}: "
            "lower export.calibration_images or use a larger source split"
        )
    return images[:calibration], images[calibration : calibration + holdout]


def _reader(images: torch.Tensor, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        """Feeds calibration images in batches (the graph's batch is dynamic), a range of batches at a time."""

        def __init__(self) -> None:
            array = images.float().cpu().numpy().astype(np.float32)
            self.batches = [array[i : i + batch_size] for i in range(0, len(array), batch_size)]
            self.pending = iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.pending, None)
            return None if batch is None else {INPUT_NAME: batch}

    return ImageReader()


def _batches_per_pass(batches: int) -> int:
    """The largest pass size up to `_BATCHES_PER_PASS` that divides ``batches`` (ONNX Runtime requires it)."""
    return max(size for size in range(1, _BATCHES_PER_PASS + 1) if batches % size == 0)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: torch.Tensor,
    method: str = "minmax",
    batch_size: int = 4,
    keep_float: Sequence[str] = (),
    calibration_cache: str | Path | None = None,
    quant_format: str = "QDQ",
    per_channel: bool = True,
    op_types: Sequence[str] | None = QUANTIZED_OPS,
    float_attention: bool = True,
) -> dict:
    """Write the int8 model of ``fp32_path`` (QDQ by default) to ``out_path`` (atomically) and describe it.

    Args:
        fp32_path: the fp32 ONNX graph.
        out_path: the int8 graph to write.
        calibration_images: ``(N, 3, H, W)`` images in ``[0, 1]`` the activation ranges are calibrated on.
        method: ONNX Runtime's calibration: ``minmax``, ``entropy`` or ``percentile``.
        batch_size: calibration images per run.
        keep_float: nodes left unquantized besides `excluded_nodes` (the sensitivity fallback's choice).
        calibration_cache: ONNX Runtime's calibration cache (JSON), read if it exists (no calibration), else written.
        quant_format: ``QDQ`` (Q/DQ pairs around float ops; what TensorRT reads) or ``QOperator`` (QLinear ops).
        per_channel: weight scales per output channel, else per tensor.
        op_types: the op types to quantize; ``None``: every op ONNX Runtime's quantizer handles.
        float_attention: keep `activation_matmuls` float (unless ``op_types`` is None); ``False``: QDQ
            quantizes them too (slower on CPU: `benchmarks/int8_speed.py`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {sorted(CALIBRATION_METHODS)}")
    out_path = Path(out_path)
    model = onnx.load(str(fp32_path))
    exclude = list(dict.fromkeys([*excluded_nodes(model), *keep_float]))
    float_attention = float_attention and op_types is not None
    reader = _reader(calibration_images, batch_size)
    passes = {"CalibStridedMinMax": _batches_per_pass(len(reader))}
    options = {**_QDQ_OPTIONS, "MatMulConstBOnly": op_types is not None, **passes}
    start = time.perf_counter()
    with atomic_path(out_path) as temp:
        quantize_static(
            model,
            str(temp),
            reader,
            quant_format=getattr(QuantFormat, quant_format),
            op_types_to_quantize=None if op_types is None else list(op_types),
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*exclude, *(activation_matmuls(model) if float_attention else [])],
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
            calibration_cache_path=None if calibration_cache is None else str(calibration_cache),
            extra_options=options,
        )
        onnx.checker.check_model(str(temp))
        ops = Counter(node.op_type for node in onnx.load(str(temp)).graph.node)
    scheme = _int8_scheme(len(calibration_images), method, quant_format, per_channel, op_types, float_attention)
    return _int8_summary(out_path, time.perf_counter() - start, scheme, exclude, ops)


def _int8_summary(out_path: Path, seconds: float, scheme: dict, exclude: list[str], ops: Counter) -> dict:
    """`quantize_int8`'s description of the graph it wrote."""
    return {
        "file": out_path.name,
        "bytes": out_path.stat().st_size,
        "quantize_s": round(seconds, 2),
        **scheme,
        "excluded_nodes": exclude,
        "quantize_linear_nodes": ops["QuantizeLinear"],
        "dequantize_linear_nodes": ops["DequantizeLinear"],
    }


def _int8_scheme(
    calibration_images: int,
    method: str,
    quant_format: str,
    per_channel: bool,
    op_types: Sequence[str] | None,
    float_attention: bool,
) -> dict:
    """How `quantize_int8` quantizes, for its summary."""
    return {
        "format": quant_format,
        "calibration_images": calibration_images,
        "calibration_method": method,
        "activations": "int8 symmetric, per tensor",
        "weights": f"int8 symmetric, per {'output channel' if per_channel else 'tensor'}",
        "quantized_ops": "all" if op_types is None else list(op_types),
        "attention_matmuls": attention_matmuls(quant_format, op_types, float_attention),
    }


def attention_matmuls(quant_format: str, op_types: Sequence[str] | None, float_attention: bool) -> str:
    """What `quantize_int8` did to the MatMuls whose two operands are activations (`activation_matmuls`)."""
    if op_types is not None and "MatMul" not in op_types:
        return "float (MatMul not quantized)"
    if float_attention or (op_types is not None and quant_format == "QOperator"):
        return "float"
    return "int8"


def _logits(path: Path, images: np.ndarray, batch_size: int) -> np.ndarray:
    session = onnx_session(path)
    return np.concatenate(
        [
            session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
    )


def _harm(comparison: dict) -> tuple[float, float]:
    """How much a quantized graph departs from fp32: argmax disagreement first, mean |logit difference| next."""
    return 1.0 - comparison["argmax_agreement"], comparison["mean_abs_diff"]


def _sensitivity(
    candidates: list[str], reference: np.ndarray, logits_of: Callable[[Sequence[str]], np.ndarray]
) -> dict[str, dict]:
    """Each candidate node quantized alone (``logits_of(nodes kept float)``, every other one float), its logits
    compared with fp32's on the held-out images; the harm (`_harm`) is the argmax disagreement, then the mean
    |logit difference|."""
    return {node: compare_logits(reference, logits_of([o for o in candidates if o != node])) for node in candidates}


def _float_node_entry(node: str, sensitivity: dict, after: dict) -> dict:
    """The fallback report's line for one node kept float."""
    return {
        "node": node,
        "why": "most harmful remaining node when quantized alone "
        f"(argmax agreement {sensitivity['argmax_agreement']:.4f}, "
        f"mean |logit diff| {sensitivity['mean_abs_diff']:.3g} on the held-out images)",
        "argmax_agreement_after": after["argmax_agreement"],
        "max_abs_diff_after": after["max_abs_diff"],
    }


def quantize_with_fallback(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: torch.Tensor,
    holdout_images: torch.Tensor,
    tolerance: ParityTolerance,
    fallback: Int8FallbackConfig,
    method: str = "minmax",
    batch_size: int = 4,
) -> dict:
    """`quantize_int8`, then keep the most sensitive nodes float until ``tolerance`` holds on ``holdout_images``.

    The most harmful nodes (`_sensitivity`) are kept float one at a time until the graph passes or
    ``fallback.max_float_nodes`` are float; the summary's ``fallback`` entry lists every float node and why.

    Args:
        fp32_path: the fp32 ONNX graph.
        out_path: the int8 graph to write.
        calibration_images: images the activation ranges are calibrated on.
        holdout_images: source images not in the calibration set, the sensitivity is measured on.
        tolerance: the int8 parity tolerance the graph must meet on ``holdout_images``.
        fallback: the recipe's fallback settings (on / off, cap on float nodes).
        method: ONNX Runtime's calibration method; batch_size: images per run.
    """
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="gkd.int8.", dir=out_path.parent) as scratch:
        cache = Path(scratch) / "calibration.json"

        def quantize(keep_float: Sequence[str], path: Path) -> dict:
            return quantize_int8(fp32_path, path, calibration_images, method, batch_size, keep_float, cache)

        info = quantize((), out_path)
        if not fallback.enabled or len(holdout_images) == 0:
            why = {"ran": False, "reason": "no held-out source images"} if fallback.enabled else {}
            return {**info, "fallback": {"enabled": fallback.enabled, **why}}
        holdout = holdout_images.float().cpu().numpy().astype(np.float32)
        reference = _logits(Path(fp32_path), holdout, batch_size)

        start = time.perf_counter()
        before = judge(compare_logits(reference, _logits(out_path, holdout, batch_size)), tolerance)
        report = {"enabled": True, "holdout_images": len(holdout), "before": before, "float_nodes": []}
        if before["passed"]:
            info["fallback"] = {**report, "ran": False, "reason": "all-int8 graph within tolerance", "after": before}
            return info

        trial_logits = _trial_logits(quantize, Path(scratch) / "trial.onnx", holdout, batch_size)
        sensitivity = _sensitivity(quantizable_nodes(onnx.load(str(fp32_path))), reference, trial_logits)
        ranked = sorted(sensitivity, key=lambda node: _harm(sensitivity[node]), reverse=True)
        keep_float, after = _keep_float_until_passing(
            ranked[: fallback.max_float_nodes],
            sensitivity,
            trial_logits,
            lambda logits: judge(compare_logits(reference, logits), tolerance),
            report["float_nodes"],
            before,
        )
        if keep_float:
            info = quantize(keep_float, out_path)
        info["fallback"] = _fallback_report(report, after, sensitivity, ranked, time.perf_counter() - start)
        return info


def _trial_logits(
    quantize: Callable[[Sequence[str], Path], dict], trial: Path, images: np.ndarray, batch_size: int
) -> Callable[[Sequence[str]], np.ndarray]:
    """``logits(nodes kept float)``: the graph quantized with those nodes float, run on ``images``."""

    def logits(keep_float: Sequence[str]) -> np.ndarray:
        quantize(keep_float, trial)
        return _logits(trial, images, batch_size)

    return logits


def _keep_float_until_passing(
    ranked: list[str],
    sensitivity: dict,
    trial_logits: Callable[[Sequence[str]], np.ndarray],
    judge_logits: Callable[[np.ndarray], dict],
    float_nodes: list[dict],
    before: dict,
) -> tuple[list[str], dict]:
    """Keep ``ranked``'s nodes float one at a time until the judged graph passes, each step appended to
    ``float_nodes``; returns the float nodes and the last judgement (``before``, the all-int8 one, if none)."""
    keep_float: list[str] = []
    after = before
    for node in ranked:
        keep_float.append(node)
        after = judge_logits(trial_logits(keep_float))
        float_nodes.append(_float_node_entry(node, sensitivity[node], after))
        if after["passed"]:
            break
    return keep_float, after


def _fallback_report(report: dict, after: dict, sensitivity: dict, ranked: list[str], seconds: float) -> dict:
    """The summary's ``fallback`` entry once the fallback ran."""
    entry = {
        **report,
        "ran": True,
        "after": after,
        "passed": after["passed"],
        "fallback_s": round(seconds, 2),
        "sensitivity": {
            node: {k: sensitivity[node][k] for k in ("argmax_agreement", "mean_abs_diff")} for node in ranked
        },
    }
    if not after["passed"]:
        entry["reason"] = (
            f"still outside tolerance with {len(report['float_nodes'])} float nodes "
            "(cap export.int8_fallback.max_float_nodes)"
        )
    return entry
