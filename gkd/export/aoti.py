"""AOTInductor: ``torch.export`` + ``aoti_compile_and_package`` -> ``model.pt2``, compiled for one device.

The batch stays dynamic (``torch.export.Dim`` over the export batch range), as in the ONNX files; the
package runs only on the device type it was compiled for (C++ kernels on CPU, Triton kernels on CUDA).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from gkd.utils.io import atomic_path


def compile_aoti(
    prepared: nn.Module, path: str | Path, img_size: Sequence[int], batch_range: Sequence[int], device: torch.device
) -> dict:
    """Compile a prepared (fixed-size) segmentor for ``device`` into the package ``path``, atomically."""
    path = Path(path)
    low, _, high = batch_range
    model = copy.deepcopy(prepared).to(device).eval()
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
        "batch_range": [low, high],
    }


def load_aoti(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled model of a package (called with a tensor on the device it was compiled for)."""
    return torch._inductor.aoti_load_package(str(path))
