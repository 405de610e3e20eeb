"""The runtimes an exported segmentor runs in, behind one interface.

``predict(batch)``: float32 numpy ``(B, 3, H, W)`` in ``[0, 1]`` -> float32 numpy logits ``(B, K, H, W)``.
For timing, `Runtime.stage` puts a batch where the runtime reads it (a CUDA tensor, an ONNX Runtime value)
and `Runtime.run` computes device-resident logits, so latency excludes host <-> device copies (as trtexec's
GPU compute time does): full-resolution logits are large and their copy would dominate a small model.

Every runtime runs on the benchmark device: PyTorch eager (fp32; bf16 / fp16 autocast on CUDA), ONNX Runtime
(CUDA provider on a GPU, CPU provider otherwise), ONNX Runtime's TensorRT provider, TensorRT engines and
AOTInductor packages. On CUDA, PyTorch eager and AOTInductor also run as CUDA graphs (``torch-cudagraph``,
``aoti-cudagraph``): one graph per input shape, captured once and replayed, so a small model at batch 1 is
not bound by the CPU launching its kernels one by one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from gkd.export.aoti import load_aoti
from gkd.export.config import RuntimeName
from gkd.export.onnx import INPUT_NAME, OUTPUT_NAME, onnx_session, prepare_for_export
from gkd.models.segmentor import Segmentor

RUNTIME_NAMES: tuple[str, ...] = get_args(RuntimeName)  # the one list: `gkd.export.config.RuntimeName`
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Runtime(ABC):
    """One runtime x precision on one device."""

    runtime: str

    def __init__(
        self, precision: str, device: torch.device, info: dict | None = None, max_batch: int | None = None
    ) -> None:
        self.precision = precision
        self.device = device
        # Artifacts take batches up to their export batch range; `predict` splits larger ones.
        self.max_batch = max_batch
        self.info = {"runtime": self.runtime, "precision": precision, "device": str(device), **(info or {})}

    def stage(self, batch: np.ndarray) -> Any:
        """The batch where `run` reads it (default: a tensor on the device)."""
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)

    @abstractmethod
    def run(self, staged: Any) -> Any:
        """Logits for a staged batch, left on the device (asynchronous on CUDA: see `synchronize`)."""

    def to_numpy(self, output: Any) -> np.ndarray:
        return output.float().cpu().numpy()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        step = self.max_batch or len(batch)
        if len(batch) > step:
            return np.concatenate([self.predict(batch[i : i + step]) for i in range(0, len(batch), step)])
        return self.to_numpy(self.run(self.stage(batch)))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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
            self.device.type, _AUTOCAST.get(self.precision), enabled=self.precision != "fp32", cache_enabled=False
        )
        with torch.inference_mode(), autocast:
            return self.model(staged)


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


class TensorRTRuntime(Runtime):
    """A serialized TensorRT engine (``gkd.export.tensorrt``)."""

    runtime = "tensorrt"

    def __init__(self, path: Path, precision: str, device: torch.device, max_batch: int | None = None) -> None:
        from gkd.export.tensorrt import TensorRTEngine

        self.engine = TensorRTEngine(path, device)
        super().__init__(precision, device, {"artifact": path.name}, max_batch)

    def run(self, staged: torch.Tensor) -> torch.Tensor:
        return self.engine(staged)


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


def _ort_providers(runtime: str, precision: str, device: torch.device, out_dir: Path, export_summary: dict) -> list:
    """Providers for an ONNX Runtime session, or a `RuntimeError` saying why this runtime cannot run here."""
    if runtime == "onnxruntime" and device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise RuntimeError(f"{runtime} needs a CUDA device; the device is {device.type}")
    import onnxruntime as ort

    available = ort.get_available_providers()
    index = device.index or 0
    if runtime == "onnxruntime":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"CUDAExecutionProvider not available (providers: {available}; gpu extra)")
        return [("CUDAExecutionProvider", {"device_id": index})]
    if "TensorrtExecutionProvider" not in available:
        raise RuntimeError(f"TensorrtExecutionProvider not available (providers: {available})")
    low, opt, high = export_summary["batch_range"]
    height, width = export_summary["img_size"]
    shape = f"{INPUT_NAME}:{{}}x3x{height}x{width}"
    options = {
        "device_id": index,
        "trt_fp16_enable": precision in ("fp16", "int8"),
        "trt_int8_enable": precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(out_dir / "ort_trt_cache"),
        "trt_timing_cache_enable": True,
        # One profile over the export batch range, so changing batch sizes does not rebuild engines.
        "trt_profile_min_shapes": shape.format(low),
        "trt_profile_opt_shapes": shape.format(opt),
        "trt_profile_max_shapes": shape.format(high),
    }
    return [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", {"device_id": index})]


Loader = Callable[[], Runtime]


def runtime_loaders(
    segmentor: Segmentor,
    img_size: Sequence[int],
    out_dir: str | Path,
    export_summary: dict,
    device: torch.device,
    names: str | Sequence[str] = "auto",
) -> tuple[dict[str, Loader], dict[str, str]]:
    """Loaders of every runtime x precision wanted here, and ``{key: why not}`` for those known not to run.

    ``names`` = ``"auto"`` or runtime names (``torch``, ``onnxruntime``, ...) to restrict to. Artifacts the
    export stage skipped (``export_summary["skipped"]``) are reported with the export's reason. A loader
    raises when its runtime does not load (missing provider, library, device); see `load_runtime`.

    Args:
        segmentor: the trained model (the torch runtimes).
        img_size: ``(H, W)`` of the artifacts.
        out_dir: the run directory holding them.
        export_summary: what the export stage wrote.
        device: where to run.
        names: ``auto`` (every runtime) or the runtimes to keep.
    """
    wanted = set(RUNTIME_NAMES if names == "auto" else names)
    out_dir = Path(out_dir)
    max_batch = export_summary.get("batch_range", [None])[-1]
    # Export skips only engines and packages, whose kinds ("tensorrt", "aoti") are also their runtimes' names.
    skipped = {key: why for key, why in export_summary.get("skipped", {}).items() if key.split("/")[0] in wanted}
    loaders: dict[str, Loader] = {"torch/fp32": lambda: TorchRuntime(segmentor, img_size, "fp32", device)}
    if device.type == "cuda":
        for precision in ("bf16", "fp16"):
            loaders[f"torch/{precision}"] = lambda p=precision: TorchRuntime(segmentor, img_size, p, device)
    capturable: dict[str, Loader] = {}  # runtimes whose CUDA-graph replay needs a runner loaded for capture
    for key, artifact in export_summary.get("artifacts", {}).items():
        kind, precision = key.split("/")
        path = out_dir / artifact["file"]
        if kind == "onnx":
            for runtime, cls in (("onnxruntime", OnnxRuntime), ("onnxruntime-trt", OnnxRuntimeTensorRT)):
                loaders[f"{runtime}/{precision}"] = lambda r=runtime, c=cls, p=precision, f=path: c(
                    f, p, device, _ort_providers(r, p, device, out_dir, export_summary), max_batch
                )
        elif kind == "tensorrt":
            loaders[key] = lambda p=precision, f=path: TensorRTRuntime(f, p, device, max_batch)
        elif kind == "aoti" and artifact["device"] != device.type:
            skipped[key] = f"the package was compiled for {artifact['device']}, the device is {device.type}"
        elif kind == "aoti":
            loaders[key] = partial(AOTIRuntime, path, precision, device, max_batch)
            capturable[key] = partial(AOTIRuntime, path, precision, device, max_batch, for_cuda_graph=True)
    if device.type == "cuda":  # CUDA-graph replay of the eager model and of each AOTInductor package
        for key in [key for key in loaders if key.split("/")[0] in ("torch", "aoti")]:
            runtime, precision = key.split("/")
            inner = capturable.get(key, loaders[key])
            loaders[f"{runtime}-cudagraph/{precision}"] = lambda inner=inner: CudaGraphRuntime(inner(), img_size)
    loaders = {key: loader for key, loader in loaders.items() if key.split("/")[0] in wanted}
    return loaders, {key: why for key, why in skipped.items() if key.split("/")[0] in wanted}


def load_runtime(loader: Loader) -> tuple[Runtime | None, str | None]:
    """``(runtime, None)``, or ``(None, why)`` when it does not load here."""
    try:
        return loader(), None
    except Exception as error:  # a runtime that does not load is reported, never fatal
        return None, f"{type(error).__name__}: {error}"
