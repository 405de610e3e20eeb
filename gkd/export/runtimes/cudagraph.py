"""CUDA-graph replay of another runtime (``torch-cudagraph``, ``aoti-cudagraph``): one graph per input shape,
captured once and replayed, so a small model at batch 1 is not bound by the CPU launching its kernels one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from gkd.export.runtimes.base import LoadContext, Runtime, RuntimeEntry


class ReusedHostConstants(TorchFunctionMode):
    """``torch.tensor`` / ``torch.as_tensor`` of Python data onto ``device``: made once, then the same tensor.

    A copy from pageable host memory cannot be recorded in a CUDA graph, yet models build small constants that
    way inside ``forward`` (transformers' Mask2Former: the feature maps' shapes, as the deformable attention's
    offset normaliser). Their values depend only on the input shape, which a graph fixes: made during the
    warm-up calls, they are found here again during capture and become constants of the graph. Keyed by the
    data itself, so a different value is never returned; callers must not write into them (none does).
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.made = 0  # how many were made rather than found

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func not in (torch.tensor, torch.as_tensor) or not args or not _python_numbers(args[0]) or device is None:
            return func(*args, **kwargs)
        if torch.device(device).type != self.device.type:
            return func(*args, **kwargs)
        key = (func.__name__, repr(args), repr(sorted(kwargs.items(), key=lambda item: item[0])))
        if key not in self.tensors:
            self.tensors[key] = func(*args, **kwargs)
            self.made += 1
        return self.tensors[key]


def _python_numbers(data: Any) -> bool:
    """Whether ``data`` is a Python number or nested lists / tuples of them (no tensor, whose value may change)."""
    if isinstance(data, list | tuple):
        return all(_python_numbers(item) for item in data)
    return isinstance(data, int | float | bool)


class CudaGraphRuntime(Runtime):
    """Another runtime's `run` captured as a CUDA graph per input shape and replayed.

    Capture follows PyTorch's recipe (``torch.cuda.graphs``): a few warm-up calls on a side stream, then one
    call recorded into a `torch.cuda.CUDAGraph` reading a static input buffer; a replay copies the batch into
    that buffer and relaunches every kernel at once. The returned logits are the graph's static output,
    overwritten by the next replay (callers copy them out first, as `predict` does). Two things a capture
    does not allow are kept out of it: small constants the model builds from host data in ``forward`` are
    made once (`ReusedHostConstants`), and AOTInductor packages run without their thread synchronisation
    (`load_aoti` ``for_cuda_graph``); both failed capture on an H100 before (benchmarks/RESULTS.md).
    """

    WARMUP_CALLS = 3

    def __init__(self, inner: Runtime, img_size: Sequence[int]) -> None:
        if inner.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device; the device is {inner.device.type}")
        self.runtime = f"{inner.runtime}-cudagraph"
        super().__init__(inner.precision, inner.device, {**inner.info, "cuda_graph": True}, inner.max_batch)
        self.inner = inner
        # per input shape: static input, static output, the graph, and the constants the graph reads (kept alive)
        self.graphs: dict[
            tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph, ReusedHostConstants]
        ] = {}
        # Capture batch 1 now: a runtime that cannot be captured does not load (reported as skipped, not failed).
        self.run(torch.zeros(1, 3, *img_size, device=self.device))

    def _capture(
        self, staged: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph, ReusedHostConstants]:
        static_input = staged.clone()
        constants = ReusedHostConstants(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), constants:
            for _ in range(self.WARMUP_CALLS):
                self.inner.run(static_input)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), constants:
            static_output = self.inner.run(static_input)
        return static_input, static_output, graph, constants

    def run(self, staged: torch.Tensor) -> torch.Tensor:
        shape = tuple(staged.shape)
        if shape not in self.graphs:
            self.graphs[shape] = self._capture(staged)
        static_input, static_output, graph, _ = self.graphs[shape]
        static_input.copy_(staged)
        graph.replay()
        return static_output


def _load(inner: RuntimeEntry, context: LoadContext, precision: str, path: Path | None) -> CudaGraphRuntime:
    return CudaGraphRuntime(inner.load(replace(context, for_cuda_graph=True), precision, path), context.img_size)


def cuda_graph_of(inner: RuntimeEntry) -> RuntimeEntry:
    """The entry of ``inner``'s runtime replayed as CUDA graphs (``<name>-cudagraph``), on CUDA only."""
    return RuntimeEntry(
        name=f"{inner.name}-cudagraph",
        load=partial(_load, inner),
        precisions=inner.precisions,
        artifact=inner.artifact,
        files=inner.files,
        devices=("cuda",),
        wraps=inner.name,
    )
