"""AOTInductor packages (`gkd.export.aoti`), compiled for the export device, and their runtime."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import get_args

import numpy as np
import torch

from gkd.export.aoti import compile_aoti, load_aoti
from gkd.export.config import AOTIPrecision
from gkd.export.parity import compare_logits, judge
from gkd.export.runtimes.base import ExportJob, LoadContext, Runtime, RuntimeEntry, artifact_files

AOTI_FILES = artifact_files("pt2", get_args(AOTIPrecision))
CUDA_PRECISIONS = tuple(p for p in AOTI_FILES if p != "fp32")  # reduced-precision packages: compiled for CUDA


class AOTIRuntime(Runtime):
    """An AOTInductor package, on the device it was compiled for."""

    runtime = "aoti"

    def __init__(
        self,
        path: Path,
        precision: str,
        device: torch.device,
        max_batch: int | None = None,
        for_cuda_graph: bool = False,
    ) -> None:
        self.model = load_aoti(path, device, for_cuda_graph)
        super().__init__(precision, device, {"artifact": path.name}, max_batch)

    def run(self, staged: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(staged)


def _load(context: LoadContext, precision: str, path: Path | None) -> AOTIRuntime:
    return AOTIRuntime(path, precision, context.device, context.max_batch, context.for_cuda_graph)


def compile_aoti_packages(job: ExportJob) -> None:
    """A package per precision of ``export.aoti_precisions``, each checked against PyTorch fp32 on the export
    device (the reference every package is compiled for)."""
    config, device = job.config, job.device
    reference: np.ndarray | None = None
    for precision in config.aoti_precisions:
        key = f"aoti/{precision}"
        if not config.aoti:
            job.summary["skipped"][key] = "disabled (export.aoti: false)"
            continue
        if precision in CUDA_PRECISIONS and device.type != "cuda":
            job.summary["skipped"][key] = f"{precision} AOTInductor packages are compiled for CUDA only"
            continue
        if reference is None:  # PyTorch fp32 on the export device: the reference of every package
            with torch.no_grad():
                reference = copy.deepcopy(job.prepared).to(device)(job.parity_images.to(device)).cpu().numpy()

        def package(p: str = precision, expected: np.ndarray = reference) -> dict:
            path = job.out_dir / AOTI_FILES[p]
            info = compile_aoti(job.prepared, path, job.img_size, config.batch_range, device, p)
            with torch.no_grad():
                candidate = load_aoti(path)(job.parity_images.to(device)).float().cpu().numpy()
            info["parity"] = judge(compare_logits(expected, candidate), config.parity.tolerance(p))
            return info

        job.attempt(key, package)


AOTI = RuntimeEntry.of_artifact(
    "aoti", "aoti", AOTI_FILES, _load, compile_aoti_packages, cuda_precisions=CUDA_PRECISIONS
)
