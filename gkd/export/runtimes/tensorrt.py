"""TensorRT engines built from the reduced-precision ONNX files (`gkd.export.tensorrt`), and their runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from gkd.export.runtimes.base import ExportJob, LoadContext, Runtime, RuntimeEntry, artifact_files
from gkd.export.runtimes.onnxruntime import ONNX_FILES
from gkd.export.tensorrt import TensorRTEngine, build_engine, tensorrt_unavailable

ENGINE_FILES = artifact_files("engine", ("fp16", "int8"))  # fp32 is PyTorch's and ONNX Runtime's to serve
TIMING_CACHE_FILE = "tensorrt.timing.cache"


class TensorRTRuntime(Runtime):
    """A serialized TensorRT engine (``gkd.export.tensorrt``)."""

    runtime = "tensorrt"

    def __init__(self, path: Path, precision: str, device: torch.device, max_batch: int | None = None) -> None:
        self.engine = TensorRTEngine(path, device)
        super().__init__(precision, device, {"artifact": path.name}, max_batch)

    def run(self, staged: torch.Tensor) -> torch.Tensor:
        return self.engine(staged)


def _load(context: LoadContext, precision: str, path: Path | None) -> TensorRTRuntime:
    return TensorRTRuntime(path, precision, context.device, context.max_batch)


def build_engines(job: ExportJob) -> None:
    """An engine per reduced precision the export asks for, from its ONNX file, on the export device."""
    config, out_dir = job.config, job.out_dir
    for precision in (p for p in ENGINE_FILES if p in config.precisions):
        key = f"tensorrt/{precision}"
        reason = "disabled (export.tensorrt: false)" if not config.tensorrt else tensorrt_unavailable(job.device)
        if not reason and f"onnx/{precision}" not in job.summary["artifacts"]:
            reason = f"no {ONNX_FILES[precision]} to build from"
        if reason:
            job.summary["skipped"][key] = reason
            continue
        job.attempt(
            key,
            lambda p=precision: build_engine(
                out_dir / ONNX_FILES[p],
                out_dir / ENGINE_FILES[p],
                p,
                job.img_size,
                config.batch_range,
                config.workspace_mib,
                out_dir / TIMING_CACHE_FILE,
            ),
        )


TENSORRT = RuntimeEntry.of_artifact("tensorrt", "tensorrt", ENGINE_FILES, _load, build_engines, devices=("cuda",))
