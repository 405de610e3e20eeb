"""AOTInductor: ``torch.export`` + ``aoti_compile_and_package`` -> ``model.pt2``, compiled for one device.

The batch stays dynamic (``torch.export.Dim`` over the export batch range), as in the ONNX files; the
package runs only on the device type it was compiled for (C++ kernels on CPU, Triton kernels on CUDA).
Reduced-precision packages (``model.bf16.pt2``, ``model.fp16.pt2``) compile the same bf16 / fp16 model as the
ONNX fp16 graph (`gkd.export.onnx.half_precision`: normalisations in fp32, float32 input and logits).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from gkd.export.onnx import half_precision
from gkd.export.precisions import TORCH_DTYPES
from gkd.utils.io import atomic_path


def compile_aoti(
    prepared: nn.Module,
    path: str | Path,
    img_size: Sequence[int],
    batch_range: Sequence[int],
    device: torch.device,
    precision: str = "fp32",
) -> dict:
    """Compile a prepared (fixed-size) segmentor for ``device`` into the package ``path``, atomically.

    Args:
        prepared: the segmentor from `gkd.export.onnx.prepare_for_export`.
        path: the ``.pt2`` package to write.
        img_size: the baked input size (H, W).
        batch_range: (min, opt, max) batch; min..max stays dynamic.
        device: where the package will run (CPU or CUDA kernels).
        precision: ``fp32``, ``bf16`` or ``fp16`` weights and activations (float32 input and logits).
    """
    path = Path(path)
    low, _, high = batch_range
    model = prepared if precision == "fp32" else half_precision(prepared, TORCH_DTYPES[precision])
    model = copy.deepcopy(model).to(device).eval()
    # torch.export specialises dimensions of size 1, so a dynamic batch needs an example batch of at least 2.
    example = torch.rand(max(2, low) if high > 1 else 1, 3, *img_size, device=device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=low, max=high)},) if high > 1 else None
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    with atomic_path(path) as temp:
        # aoti_compile_and_package insists on a ".pt2" name; compile beside the temp file, then move it in.
        staging = temp.with_name(temp.name + ".pt2")
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(staging))
            os.replace(staging, temp)
        finally:
            staging.unlink(missing_ok=True)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "compile_s": round(time.perf_counter() - start, 2),
        "device": device.type,
        "precision": precision,
        "batch_range": [low, high],
    }


def load_aoti(
    path: str | Path, device: torch.device | None = None, for_cuda_graph: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled model of a package (called with a tensor on the device it was compiled for).

    Args:
        path: the ``.pt2`` package.
        device: the CUDA device to load it on (default: the current one); ignored for CPU packages.
        for_cuda_graph: load the runner without its thread synchronisation, whose event waits are not
            allowed while a CUDA graph is captured (PyTorch's ``run_single_threaded``).
    """
    index = device.index if device is not None and device.type == "cuda" and device.index is not None else -1
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=for_cuda_graph, device_index=index)
