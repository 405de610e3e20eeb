"""ONNX files (fp32 / fp16 / int8 QDQ) and the runtimes that run them: ONNX Runtime (CUDA provider on a GPU,
CPU provider otherwise) and ONNX Runtime's TensorRT execution provider, which reuses the same files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from gkd.export.config import OnnxPrecision
from gkd.export.int8_qad import quantize_qad
from gkd.export.onnx import (
    INPUT_NAME,
    OUTPUT_NAME,
    check_parity,
    export_onnx,
    half_precision,
    onnx_session,
    onnxruntime_unavailable,
)
from gkd.export.quantize import quantize_with_fallback, split_calibration
from gkd.export.runtimes.base import ExportJob, LoadContext, Runtime, RuntimeEntry, artifact_files

log = logging.getLogger("gkd")

ONNX_FILES = artifact_files("onnx", get_args(OnnxPrecision))
FP16_NUMERICS = (
    "fp16 weights and activations; LayerNorm computed in fp32 between explicit Casts; softmax in fp16 "
    "(q and k pre-scaled by the exporter); float32 input and logits"
)


class OnnxRuntime(Runtime):
    """An ONNX file in ONNX Runtime, I/O bound on the device (``io_binding``), so no copies are timed.

    Args:
        path: the ONNX file.
        precision: its precision (for the record).
        device: where its inputs and outputs live.
        providers: ONNX Runtime execution providers, preferred first (name or ``(name, options)``).
        max_batch: the largest batch the graph takes.
    """

    runtime = "onnxruntime"

    def __init__(
        self,
        path: Path,
        precision: str,
        device: torch.device,
        providers: Sequence[str | tuple[str, dict]],
        max_batch: int | None = None,
    ) -> None:
        self.session = onnx_session(path, providers)
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.session.get_providers()[0] != wanted:
            # ONNX Runtime falls back silently when a provider's libraries fail to load.
            raise RuntimeError(f"{wanted} did not load (session runs on {self.session.get_providers()})")
        self.ort_device = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
        info = {"artifact": path.name, "providers": self.session.get_providers()}
        super().__init__(precision, device, info, max_batch)

    def stage(self, batch: np.ndarray) -> Any:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), *self.ort_device)

    def run(self, staged: Any) -> Any:
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, staged)
        binding.bind_output(OUTPUT_NAME, *self.ort_device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def to_numpy(self, output: Any) -> np.ndarray:
        return output.numpy()


class OnnxRuntimeTensorRT(OnnxRuntime):
    """ONNX Runtime's TensorRT execution provider (it builds and caches its own engines)."""

    runtime = "onnxruntime-trt"


def _load(context: LoadContext, precision: str, path: Path | None) -> OnnxRuntime:
    """ONNX Runtime's CPU provider on a CPU, its CUDA provider on a GPU."""
    if context.device.type == "cpu":
        providers: list = ["CPUExecutionProvider"]
    else:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                f"CUDAExecutionProvider not available (providers: {ort.get_available_providers()}; gpu extra)"
            )
        providers = [("CUDAExecutionProvider", {"device_id": context.device.index or 0})]
    return OnnxRuntime(path, precision, context.device, providers, context.max_batch)


def _load_tensorrt_provider(context: LoadContext, precision: str, path: Path | None) -> OnnxRuntimeTensorRT:
    """ONNX Runtime's TensorRT provider (CUDA as its fallback), one profile over the export batch range."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "TensorrtExecutionProvider" not in available:
        raise RuntimeError(f"TensorrtExecutionProvider not available (providers: {available})")
    low, opt, high = context.export_summary["batch_range"]
    height, width = context.export_summary["img_size"]
    shape = f"{INPUT_NAME}:{{}}x3x{height}x{width}"
    index = context.device.index or 0
    options = {
        "device_id": index,
        "trt_fp16_enable": precision != "fp32",  # fp16 and int8 graphs
        "trt_int8_enable": precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(context.out_dir / "ort_trt_cache"),
        "trt_timing_cache_enable": True,
        # One profile over the export batch range, so changing batch sizes does not rebuild engines.
        "trt_profile_min_shapes": shape.format(low),
        "trt_profile_opt_shapes": shape.format(opt),
        "trt_profile_max_shapes": shape.format(high),
    }
    providers = [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", {"device_id": index})]
    return OnnxRuntimeTensorRT(path, precision, context.device, providers, context.max_batch)


def _onnx_file(job: ExportJob, precision: str, onnxruntime_missing: str | None) -> dict:
    """Write the ONNX file of ``precision`` (int8: quantized from ``model.onnx``) and check its parity."""
    config, path = job.config, job.out_dir / ONNX_FILES[precision]
    if precision == "int8":
        fallback = config.int8_fallback
        calibration, holdout = split_calibration(
            job.calibration_images, config.calibration_images, fallback.holdout_images if fallback.enabled else 0
        )
        if job.qad is not None:
            images = (calibration, holdout, job.parity_images)
            info = quantize_qad(
                job.prepared, job.out_dir / ONNX_FILES["fp32"], path, images, config, job.img_size, job.qad
            )
        else:
            info = quantize_with_fallback(
                job.out_dir / ONNX_FILES["fp32"],
                path,
                calibration,
                holdout,
                config.parity.tolerance("int8"),
                fallback,
                config.calibration_method,
            )
            info["method"] = "ptq"
    else:
        model = job.prepared if precision == "fp32" else half_precision(job.prepared)
        info = export_onnx(model, path, job.img_size, config.opset, config.batch_range)
    if precision == "fp16":
        info["numerics"] = FP16_NUMERICS
    if not onnxruntime_missing:
        info["parity"] = check_parity(job.prepared, path, job.parity_images, config.parity.tolerance(precision))
    return info


def export_onnx_files(job: ExportJob) -> None:
    """The ONNX file of every precision the export asks for. Without ONNX Runtime the fp32 / fp16 files are
    still written (their parity ``not_checked``) and int8 is skipped: its quantizer is ONNX Runtime's."""
    summary, onnxruntime_missing = job.summary, onnxruntime_unavailable()
    for precision in job.config.precisions:
        key = f"onnx/{precision}"
        if precision == "int8" and onnxruntime_missing:
            summary["skipped"][key] = f"not quantized (ONNX Runtime's quantizer): {onnxruntime_missing}"
            continue
        if precision == "int8" and "onnx/fp32" not in summary["artifacts"]:
            summary["failed"][key] = "not quantized: model.onnx (fp32) was not written"
            continue
        job.attempt(key, lambda p=precision: _onnx_file(job, p, onnxruntime_missing))
        if onnxruntime_missing and key in summary["artifacts"]:
            summary["not_checked"][key] = onnxruntime_missing
            log.warning("export: %s written, its parity not checked: %s", key, onnxruntime_missing)
    written = [p for p in job.config.precisions if f"onnx/{p}" in summary["artifacts"]]
    log.info("export: ONNX %s written to %s", ", ".join(written) or "nothing", job.out_dir)


ONNXRUNTIME = RuntimeEntry.of_artifact(
    "onnxruntime", "onnx", ONNX_FILES, _load, export_onnx_files, library_missing=onnxruntime_unavailable
)
# the same ONNX files in ONNX Runtime's TensorRT execution provider
ONNXRUNTIME_TRT = replace(
    ONNXRUNTIME, name="onnxruntime-trt", load=_load_tensorrt_provider, exporter=None, devices=("cuda",)
)
