"""The export stage: every registered runtime's artifacts written, each checked against PyTorch fp32, and a
JSON-able summary of what was written.

Artifacts are keyed ``kind/precision`` (``onnx/fp32``, ``onnx/fp16``, ``onnx/int8``, ``tensorrt/fp16``,
``tensorrt/int8``, ``aoti/fp32``); their file names are their registry entries' (`gkd.export.runtimes`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from gkd.export.config import ExportConfig
from gkd.export.latency import environment_info
from gkd.export.onnx import INPUT_NAME, OUTPUT_NAME, baked_size, prepare_for_export
from gkd.export.qdq_mirror import QADTraining
from gkd.export.runtimes import RUNTIMES, ExportJob
from gkd.models.segmentor import Segmentor
from gkd.utils.io import atomic_path

log = logging.getLogger("gkd")

PARITY_FILE = "parity_images.npy"


def _save_parity_images(path: Path, images: torch.Tensor) -> None:
    with atomic_path(path) as temp, temp.open("wb") as handle:
        np.save(handle, images.float().cpu().numpy())


def _graph_io(prepared: Segmentor, img_size: tuple[int, int], image: torch.Tensor) -> dict:
    """What every exported graph takes and returns: input and output tensors (the output's shape as the model
    computes it on ``image``) and the mean/std the graph normalises with."""
    with torch.no_grad():
        output_shape = list(prepared(image.float().cpu()).shape[1:])
    return {
        "img_size": list(img_size),
        "encoder_input_size": list(baked_size(prepared, img_size)),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, *img_size], "range": [0.0, 1.0]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", *output_shape]},
        "normalisation": {
            "in_graph": True,
            "mean": [round(float(v), 6) for v in prepared.encoder.mean.flatten()],
            "std": [round(float(v), 6) for v in prepared.encoder.std.flatten()],
        },
    }


def export_artifacts(
    segmentor: Segmentor,
    img_size: tuple[int, int],
    out_dir: Path,
    config: ExportConfig,
    calibration_images: torch.Tensor,
    parity_images: torch.Tensor,
    device: torch.device,
    qad: QADTraining | None = None,
) -> dict:
    """Write every artifact ``config`` asks for to ``out_dir`` and check each against PyTorch fp32.

    ONNX files are exported from a CPU copy and checked in ONNX Runtime's CPU provider; engines and the
    AOTInductor packages are built on ``device``. Each artifact's parity is judged by its precision's
    tolerance (``config.parity``, `gkd.export.parity`). An artifact that misses parity stays in
    ``artifacts`` with its numbers and is listed under ``failed``, as is one that does not build; missing
    TensorRT or GPU puts artifacts under ``skipped`` with the reason. Without ONNX Runtime the fp32 / fp16
    ONNX files are still written, listed under ``not_checked`` (their parity) and int8 is skipped (its
    quantizer is ONNX Runtime's). Nothing aborts the stage.

    Args:
        segmentor: the trained model.
        img_size: ``(H, W)`` every artifact takes.
        out_dir: where the artifacts and the parity images go.
        config: the recipe's export block (precisions, opset, batch range, engines, parity tolerances).
        calibration_images: source images for int8: the first ``config.calibration_images`` calibrate, up to
            ``config.int8_fallback.holdout_images`` more are the sensitivity fallback's held-out set.
        parity_images: images every artifact is compared with PyTorch fp32 on (saved for the benchmark).
        device: where engines and AOTInductor packages are built.
        qad: trains the fake-quantized student (``export.int8.method: qad``); None: int8 by PTQ.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img_size = (int(img_size[0]), int(img_size[1]))
    prepared = prepare_for_export(segmentor, img_size).to("cpu")
    summary: dict = {
        **_graph_io(prepared, img_size, parity_images[:1]),
        "opset": config.opset,
        "batch_range": list(config.batch_range),
        "parity_images": PARITY_FILE,
        "parity_tolerances": config.parity.model_dump(),
        "artifacts": {},
        "skipped": {},
        "failed": {},
        "not_checked": {},
        "environment": environment_info(),
    }
    _save_parity_images(out_dir / PARITY_FILE, parity_images)
    job = ExportJob(prepared, out_dir, config, device, img_size, calibration_images, parity_images, summary, qad)
    for entry in RUNTIMES:  # registry order: the ONNX files before the engines built from them
        if entry.exporter is not None:
            entry.exporter(job)
    for key, reason in summary["skipped"].items():
        log.warning("export: skipped %s: %s", key, reason)
    return summary
