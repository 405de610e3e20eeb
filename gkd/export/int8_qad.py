"""``model.int8.onnx`` by quantization-aware distillation (``export.int8.method: qad``).

The PTQ graph is made first (`quantize_with_fallback`, its calibration ranges kept); the student is fake-quantized
as that graph computes (`gkd.export.qdq_mirror`) and fine-tuned (`gkd.compress.qad`); its trained fp32 weights are
exported and quantized by ONNX Runtime with the PTQ calibration ranges and the same float nodes, so the int8 graph
has the PTQ graph's scheme, quantized tensors and activation scales, and only its weights differ. The record keeps
the PTQ graph's parity beside the QAD one's, and how closely the fake-quantized student matched the PTQ graph.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from gkd.export.onnx import INPUT_NAME, check_parity, export_onnx, onnx_session
from gkd.export.parity import compare_logits
from gkd.export.qdq_mirror import activation_scales, fake_quantized, quant_plan
from gkd.export.quantize import excluded_nodes, quantize_int8, quantize_with_fallback
from gkd.export.runtimes.base import ExportJob


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


def quantize_qad(job: ExportJob, fp32_path: Path, out_path: Path, calibration: torch.Tensor, holdout: torch.Tensor):
    """Write ``out_path`` from the QAD-trained student (``job.qad``); returns the int8 summary with ``method``,
    the PTQ graph's summary and parity (``ptq``) and the fine-tune's record (``qad``)."""
    config = job.config
    with tempfile.TemporaryDirectory(prefix="gkd.qad.", dir=out_path.parent) as scratch:
        cache, ptq_path = Path(scratch) / "calibration.json", Path(scratch) / "ptq.int8.onnx"
        ptq = quantize_with_fallback(
            fp32_path,
            ptq_path,
            calibration,
            holdout,
            config.parity.tolerance("int8"),
            config.int8_fallback,
            config.calibration_method,
            calibration_cache=cache,
        )
        ptq["parity"] = check_parity(job.prepared, ptq_path, job.parity_images, config.parity.tolerance("int8"))
        student = copy.deepcopy(job.prepared).eval()
        fp32_graph, ptq_graph = onnx.load(str(fp32_path)), onnx.load(str(ptq_path))
        plan = quant_plan(fp32_graph, ptq_graph, student)
        gap = mirror_gap(student, fp32_path, ptq_path, job.parity_images)
        record = {"plan": plan.summary(), "mirror_gap": gap, **job.qad(student, plan)}
        trained = Path(scratch) / "qad.onnx"
        export_onnx(student.cpu().eval(), trained, job.img_size, config.opset, config.batch_range)
        float_nodes = [n for n in ptq["excluded_nodes"] if n not in excluded_nodes(fp32_graph)]
        info = quantize_int8(trained, out_path, calibration, config.calibration_method, 4, float_nodes, cache)
        if activation_scales(onnx.load(str(out_path))) != activation_scales(ptq_graph):
            raise RuntimeError("the QAD graph's quantized tensors or scales differ from the PTQ graph's")
    return {**info, "method": "qad", "ptq": ptq, "qad": record}
