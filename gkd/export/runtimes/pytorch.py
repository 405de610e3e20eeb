"""PyTorch eager on the fixed-size model: the reference every artifact is held to (fp32), and autocast."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from gkd.export.onnx import prepare_for_export
from gkd.export.precisions import TORCH_DTYPES
from gkd.export.runtimes.base import LoadContext, Runtime, RuntimeEntry
from gkd.models.segmentor import Segmentor


class TorchRuntime(Runtime):
    """PyTorch eager on the fixed-size model; bf16 / fp16 by autocast (CUDA only)."""

    runtime = "torch"

    def __init__(self, segmentor: Segmentor, img_size: Sequence[int], precision: str, device: torch.device) -> None:
        if precision != "fp32" and device.type != "cuda":
            raise ValueError(f"torch {precision} autocast is only benchmarked on CUDA")
        super().__init__(precision, device, {"autocast": precision != "fp32"})
        self.model = prepare_for_export(segmentor, img_size).to(device)

    def run(self, staged: torch.Tensor) -> torch.Tensor:
        # No cast cache: it would outlive a CUDA-graph capture (torch.cuda.graphs) and saves nothing per call.
        autocast = torch.autocast(
            self.device.type, TORCH_DTYPES[self.precision], enabled=self.precision != "fp32", cache_enabled=False
        )
        with torch.inference_mode(), autocast:
            return self.model(staged)


def _load(context: LoadContext, precision: str, path: Path | None) -> TorchRuntime:
    return TorchRuntime(context.segmentor, context.img_size, precision, context.device)


TORCH = RuntimeEntry(
    name="torch",
    load=_load,
    precisions=tuple(TORCH_DTYPES),
    cuda_precisions=tuple(p for p in TORCH_DTYPES if p != "fp32"),  # autocast
)
