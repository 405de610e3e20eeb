"""The runtimes an exported segmentor runs in, behind one interface (`Runtime`), registered as data.

Every runtime runs on the benchmark device: PyTorch eager (fp32; bf16 / fp16 autocast on CUDA), ONNX Runtime
(CUDA provider on a GPU, CPU provider otherwise), ONNX Runtime's TensorRT provider, TensorRT engines and
AOTInductor packages. On CUDA, PyTorch eager and AOTInductor also run as CUDA graphs (``torch-cudagraph``,
``aoti-cudagraph``). Each is one `RuntimeEntry` of `registry.RUNTIMES`, in a module of its family.
"""

from gkd.export.runtimes.aoti import AOTI_FILES, AOTIRuntime
from gkd.export.runtimes.base import ExportJob, LoadContext, Runtime, RuntimeEntry
from gkd.export.runtimes.cudagraph import CudaGraphRuntime, ReusedHostConstants
from gkd.export.runtimes.onnxruntime import ONNX_FILES, OnnxRuntime, OnnxRuntimeTensorRT
from gkd.export.runtimes.pytorch import TorchRuntime
from gkd.export.runtimes.registry import (
    RUNTIME_NAMES,
    RUNTIMES,
    Loader,
    RuntimeName,
    load_runtime,
    runtime_loaders,
)
from gkd.export.runtimes.tensorrt import ENGINE_FILES, TensorRTRuntime

__all__ = [
    "AOTI_FILES",
    "ENGINE_FILES",
    "ONNX_FILES",
    "RUNTIMES",
    "RUNTIME_NAMES",
    "AOTIRuntime",
    "CudaGraphRuntime",
    "ExportJob",
    "LoadContext",
    "Loader",
    "OnnxRuntime",
    "OnnxRuntimeTensorRT",
    "ReusedHostConstants",
    "Runtime",
    "RuntimeEntry",
    "RuntimeName",
    "TensorRTRuntime",
    "TorchRuntime",
    "load_runtime",
    "runtime_loaders",
]
