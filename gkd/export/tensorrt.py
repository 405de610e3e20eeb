"""TensorRT engines from the exported ONNX files, and a runner for them (TensorRT Python API, imported lazily).

Every network is strongly typed, on TensorRT 10 as on 11: precision comes from the graph, not from builder
flags. ``model.fp16.onnx`` is fp16 with its LayerNorms in fp32 between Casts (no fp16 LayerNorm overflow),
``model.int8.onnx`` is int8 where it has Q/DQ pairs and fp32 elsewhere. TensorRT 11 removed the weak-typing
flags (``BuilderFlag.FP16`` / ``INT8``, precision constraints) and 10.12 deprecated them; the
``STRONGLY_TYPED`` creation flag is required on 10.x and accepted (ignored) on 11.x.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gkd.export.onnx import INPUT_NAME
from gkd.utils.io import atomic_path

log = logging.getLogger("gkd")


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


def _use_timing_cache(config, path: Path) -> None:
    """Load the timing cache at ``path`` into ``config``; one of another GPU or TensorRT starts fresh."""
    if path.is_file() and config.set_timing_cache(config.create_timing_cache(path.read_bytes()), False):
        return
    if path.is_file():
        log.warning("TensorRT timing cache %s does not match this GPU / TensorRT; starting a new one", path.name)
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise EngineBuildError("TensorRT refused an empty timing cache")


def _add_profile(builder, config, img_size: Sequence[int], batch_range: tuple[int, int, int]) -> None:
    """The input's optimization profile: batches ``(min, opt, max)`` at ``img_size``."""
    low, opt, high = batch_range
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (low, 3, *img_size), (opt, 3, *img_size), (high, 3, *img_size))
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimization profile batch {low}..{high} at {img_size}")


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

    Args:
        onnx_path: the graph (its own precision: fp16 or int8 Q/DQ; the network is strongly typed).
        engine_path: the engine file to write.
        precision: recorded in the summary.
        img_size: ``(H, W)`` of the input.
        batch_range: ``(min, opt, max)`` batch of the optimization profile.
        workspace_mib: TensorRT's workspace memory pool limit.
        timing_cache_path: the timing cache to read and update.
    """
    import tensorrt as trt

    engine_path, timing_cache_path = Path(engine_path), Path(timing_cache_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    low, opt, high = batch_range
    _add_profile(builder, config, img_size, (low, opt, high))
    _use_timing_cache(config, timing_cache_path)

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
        "precision": precision,
        "typing": f"strong (TensorRT {trt.__version__}): precision from the ONNX graph",
        "profile": {"min": low, "opt": opt, "max": high},
        "workspace_mib": workspace_mib,
        "timing_cache": timing_cache_path.name,
    }


class TensorRTEngine:
    """Runs a serialized engine on torch CUDA tensors (``set_tensor_address`` + ``execute_async_v3``).

    The engine runs on a stream of its own, never on CUDA's legacy default stream (where TensorRT adds a
    synchronisation per call), ordered after the caller's current stream and before its next work.
    """

    def __init__(self, path: str | Path, device: torch.device) -> None:
        import tensorrt as trt

        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        self.stream = torch.cuda.Stream(device)
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
        if not self.context.set_input_shape(self.input, tuple(images.shape)):
            raise RuntimeError(f"TensorRT: input shape {tuple(images.shape)} is outside the engine's profile")
        logits = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device=self.device)
        for name, tensor in ((self.input, images), (self.output, logits)):
            if not self.context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of tensor {name}")
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the input is written on the caller's stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        caller.wait_stream(self.stream)  # whatever reads (or frees) the tensors comes after the engine
        return logits
