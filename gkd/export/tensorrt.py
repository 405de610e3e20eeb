"""TensorRT engines from the exported ONNX files, and a runner for them (TensorRT Python API, imported lazily).

TensorRT 10 and 11 are told apart at run time by ``hasattr(trt.BuilderFlag, "FP16")`` (10.x only):

- 11.x: every network is strongly typed, so precision comes from the graph: ``model.fp16.onnx`` is fp16 with
  its LayerNorms in fp32 between Casts, ``model.int8.onnx`` is int8 where it has Q/DQ pairs and fp32 elsewhere.
- 10.x: a weakly typed network with builder flags (FP16; INT8 + FP16 for the Q/DQ graph, so layers outside the
  Q/DQ pairs may run in fp16) and normalisation layers pinned to fp32 (layer precision + obey constraints),
  against fp16 LayerNorm overflow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gkd.export.onnx import INPUT_NAME
from gkd.utils.io import atomic_path


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a network."""


def tensorrt_unavailable(device: torch.device) -> str | None:
    """Why engines cannot be built or run here, or ``None`` when they can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as error:
        return f"TensorRT is not installed (import tensorrt: {error})"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"TensorRT needs a CUDA device; the device is {device.type}"
    return None


def _weakly_typed(trt) -> bool:
    return hasattr(trt.BuilderFlag, "FP16")


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str,
    img_size: Sequence[int],
    batch_range: Sequence[int],
    workspace_mib: int,
    timing_cache_path: str | Path,
) -> dict:
    """Parse ``onnx_path``, build a serialized engine for the batch range and write it atomically.

    The timing cache at ``timing_cache_path`` is loaded when present and saved back after the build, so
    later builds (the other precision, a re-run) skip kernel timings already measured on this GPU.
    """
    import tensorrt as trt

    engine_path, timing_cache_path = Path(engine_path), Path(timing_cache_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    low, opt, high = batch_range
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (low, 3, *img_size), (opt, 3, *img_size), (high, 3, *img_size))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache_path.read_bytes() if timing_cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    if _weakly_typed(trt):
        typing = "weak (TensorRT 10): builder flags FP16" + (" + INT8" if precision == "int8" else "")
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        typing += ", normalisation layers pinned to fp32"
    else:
        typing = "strong (TensorRT 11): precision from the ONNX graph"

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {engine_path.name} (see the TensorRT log above)")
    with atomic_path(engine_path) as temp:
        temp.write_bytes(serialized)
    with atomic_path(timing_cache_path) as temp:
        temp.write_bytes(config.get_timing_cache().serialize())
    return {
        "file": engine_path.name,
        "bytes": engine_path.stat().st_size,
        "build_s": round(time.perf_counter() - start, 2),
        "source": Path(onnx_path).name,
        "tensorrt_version": trt.__version__,
        "typing": typing,
        "profile": {"min": low, "opt": opt, "max": high},
        "workspace_mib": workspace_mib,
        "timing_cache": timing_cache_path.name,
    }


class TensorRTEngine:
    """Runs a serialized engine on torch CUDA tensors (``set_tensor_address`` + ``execute_async_v3``)."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        import tensorrt as trt

        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {name: self.engine.get_tensor_mode(name) for name in names}
        self.input = next(name for name in names if modes[name] == trt.TensorIOMode.INPUT)
        self.output = next(name for name in names if modes[name] == trt.TensorIOMode.OUTPUT)
        # Our graphs take and return float32 whatever their internal precision (gkd.export.onnx).
        for name in (self.input, self.output):
            if self.engine.get_tensor_dtype(name) != trt.float32:
                raise RuntimeError(f"{path}: tensor {name} is {self.engine.get_tensor_dtype(name)}, expected float32")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32).contiguous()
        self.context.set_input_shape(self.input, tuple(images.shape))
        logits = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device=self.device)
        self.context.set_tensor_address(self.input, images.data_ptr())
        self.context.set_tensor_address(self.output, logits.data_ptr())
        # The current torch stream orders the engine with the copies and allocations around it.
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return logits
