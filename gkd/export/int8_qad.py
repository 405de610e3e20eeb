"""``model.int8.onnx`` by quantization-aware distillation (``export.int8.method: qad``).

The PTQ graph is made first (`quantize_with_fallback`, its calibration ranges kept in a cache); the student is
fake-quantized as that graph computes (`gkd.export.qdq_mirror`) and fine-tuned (`gkd.compress.qad`); its trained
fp32 weights are exported and quantized by ONNX Runtime with the PTQ calibration ranges and the same float nodes,
so the int8 graph has the PTQ graph's scheme and quantized tensors; only its weights differ, and its activation
scales where they were learned (``export.int8.learn_scales``: the calibration ranges replaced by the learned ones).
The record keeps the PTQ graph's parity beside the QAD one's, and how closely the fake-quantized student matched
the PTQ graph before training (``mirror_gap``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from gkd.export.config import ExportConfig
from gkd.export.onnx import INPUT_NAME, check_parity, export_onnx, onnx_session
from gkd.export.parity import compare_logits
from gkd.export.qdq_mirror import QADTraining, activation_scales, fake_quantized, quant_plan
from gkd.export.quantize import excluded_nodes, quantize_int8, quantize_with_fallback


def literal_qdq_logits(path: Path, images: torch.Tensor) -> np.ndarray:
    """An int8 graph's logits with ONNX Runtime's graph optimizations off: Q/DQ computed as written (the
    semantics TensorRT implements), not the CPU's fused int8 kernels."""
    return onnx_session(path, optimize=False).run(None, {INPUT_NAME: images.float().numpy()})[0]


def mirror_gap(model: torch.nn.Module, fp32: Path, int8: Path, images: torch.Tensor) -> dict:
    """How closely ``model`` fake-quantized as ``int8`` computes it (before any training): its logits against the
    graph's (Q/DQ as written), beside fp32's against the graph's."""
    plan = quant_plan(onnx.load(str(fp32)), onnx.load(str(int8)), model)
    graph = literal_qdq_logits(int8, images)
    with torch.no_grad():
        reference = model(images).numpy()
        with fake_quantized(model, plan):
            mirrored = model(images).numpy()
    mirror, fp32_gap = compare_logits(graph, mirrored), compare_logits(graph, reference)
    keys = ("mean_abs_diff", "max_abs_diff", "argmax_agreement")
    return {"fake_quant_vs_int8": {k: mirror[k] for k in keys}, "fp32_vs_int8": {k: fp32_gap[k] for k in keys}}


def _with_scales(cache: Path, scales: dict[str, float], out: Path) -> Path:
    """A copy of ONNX Runtime's calibration cache whose ranges give ``scales`` (symmetric int8 activations: the
    scale is ``max|range| / 127``)."""
    data = json.loads(cache.read_text())
    for tensor, scale in scales.items():
        entry = data["data"][tensor]
        entry["lowest"]["data"], entry["highest"]["data"] = [-scale * 127], [scale * 127]
    out.write_text(json.dumps(data))
    return out


def _scale_ratios(learned: dict[str, float], initial: dict[str, float]) -> dict:
    """How far the learned scales moved from the PTQ ones (learned / PTQ)."""
    ratios = np.array([learned[tensor] / initial[tensor] for tensor in initial])
    return {key: round(float(f(ratios)), 4) for key, f in (("min", np.min), ("median", np.median), ("max", np.max))}


def _check_scales(written: dict[str, float], expected: dict[str, float]) -> None:
    """The QAD graph quantizes the PTQ graph's tensors, at ``expected``'s scales."""
    tensors = written.keys() | expected.keys()
    pairs = {t: (written.get(t), expected.get(t)) for t in sorted(tensors)}
    wrong = {t: pair for t, pair in pairs.items() if not _close(*pair)}
    if wrong:
        raise RuntimeError(f"the QAD graph's quantized tensors or scales (written, planned) differ: {wrong}")


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-5)


def quantize_qad(
    prepared: torch.nn.Module,
    fp32_path: Path,
    out_path: Path,
    images: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    config: ExportConfig,
    img_size: tuple[int, int],
    train: QADTraining,
) -> dict:
    """Write ``out_path`` from the QAD-trained student; returns the int8 summary with ``method``, the PTQ graph's
    summary and parity (``ptq``) and the fine-tune's record (``qad``).

    Args:
        prepared: the fixed-size fp32 student ``fp32_path`` was exported from (left unchanged).
        fp32_path: its fp32 ONNX graph.
        out_path: the int8 graph to write.
        images: the calibration images, the fallback's held-out images and the parity images.
        config: the recipe's export block.
        img_size: ``(H, W)`` of the graph's input.
        train: fine-tunes a copy of ``prepared`` fake-quantized by a plan (`gkd.compress.qad.train_qad`).
    """
    calibration, holdout, parity_images = images
    with tempfile.TemporaryDirectory(prefix="gkd.qad.", dir=out_path.parent) as scratch:
        cache, ptq_path = Path(scratch) / "calibration.json", Path(scratch) / "ptq.int8.onnx"
        tolerance, method = config.parity.tolerance("int8"), config.calibration_method
        ptq = quantize_with_fallback(fp32_path, ptq_path, calibration, holdout, tolerance, config.int8_fallback, method)
        # the PTQ calibration ranges, kept for the QAD graph (the same images and method: the same ranges)
        quantize_int8(fp32_path, Path(scratch) / "calibrated.onnx", calibration, method, calibration_cache=cache)
        ptq["parity"] = check_parity(prepared, ptq_path, parity_images, tolerance)
        student = copy.deepcopy(prepared).eval()
        fp32_graph, ptq_graph = onnx.load(str(fp32_path)), onnx.load(str(ptq_path))
        plan = quant_plan(fp32_graph, ptq_graph, student)
        gap = mirror_gap(student, fp32_path, ptq_path, parity_images)
        record = {"plan": plan.summary(), "mirror_gap": gap, **train(student, plan)}
        trained = Path(scratch) / "qad.onnx"
        export_onnx(student.cpu().eval(), trained, img_size, config.opset, config.batch_range)
        float_nodes = [n for n in ptq["excluded_nodes"] if n not in excluded_nodes(fp32_graph)]
        written = Path(scratch) / out_path.name
        learned = record.pop("activation_scales", None)
        if learned is not None:
            cache = _with_scales(cache, learned, Path(scratch) / "learned.json")
            record["learned_scales"] = _scale_ratios(learned, plan.scales)
        info = quantize_int8(trained, written, calibration, method, keep_float=float_nodes, calibration_cache=cache)
        _check_scales(activation_scales(onnx.load(str(written))), learned or plan.scales)
        os.replace(written, out_path)  # the same file system: out_path appears whole, or not at all
    return {**info, "method": "qad", "ptq": ptq, "qad": record}
