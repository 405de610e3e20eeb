"""A Triton Inference Server model repository from a run's exported artifacts.

Triton serves one model per folder: ``<repository>/<model>/<version>/model.onnx`` (ONNX Runtime backend) or
``model.plan`` (TensorRT backend), described by ``<model>/config.pbtxt``, a ``ModelConfig`` protobuf in text
format (github.com/triton-inference-server/common, ``model_config.proto``). Each artifact of ``export.json``
that Triton can serve becomes one model: the fp32 ONNX file under the run's name, the others as
``<name>_<kind>_<precision>`` (``default_onnx_fp16``, ``default_tensorrt_fp16``). AOTInductor packages have
no Triton backend, and artifacts that failed the export's checks are not served: both are left out.

Inputs and outputs are read from the fp32 ONNX graph: ``images`` float32 ``(B, 3, H, W)`` in [0, 1],
``logits`` float32 ``(B, K, H, W)`` for every artifact (the export keeps float32 I/O at every precision).
Triton's ``dims`` leave out the batch axis; ``max_batch_size`` is the top of the export's batch range, which
the TensorRT profile was built for, and dynamic batching prefers its opt and max batches. The deployment contract
of ``export.json`` (`gkd.export.contract`: layout, value range, normalisation in the graph, the inference mode the
reported mIoU used) heads each config as ``#`` comments.

The config is written as text here rather than through ``tritonclient``'s protobuf, so exporting needs no
extra package; the tests parse it with that protobuf. Each model folder is assembled beside its final place
and renamed into it, so a repository never holds half a model.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from gkd.export.contract import contract_lines
from gkd.rundir import EXPORT_FILE
from gkd.utils.io import read_json

log = logging.getLogger("gkd")

ONNX_PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"
MODEL_FILES = {"onnx": ("model.onnx", ONNX_PLATFORM), "tensorrt": ("model.plan", TENSORRT_PLATFORM)}
CONFIG_FILE = "config.pbtxt"
# Triton data type names (model_config.proto DataType) of the ONNX tensor element types we export.
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}
MAX_QUEUE_DELAY_US = 100


def _tensor(value: onnx.ValueInfoProto, path: Path) -> dict:
    """Name, Triton data type and dims without the batch axis of a graph input or output."""
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    if tensor_type.elem_type not in ONNX_TO_TRITON or len(dims) < 2 or -1 in dims[1:]:
        raise ValueError(f"{path}: {value.name} is not a float tensor with a dynamic batch and fixed dims ({dims})")
    return {"name": value.name, "data_type": ONNX_TO_TRITON[tensor_type.elem_type], "dims": dims[1:]}


def onnx_io(path: str | Path) -> tuple[dict, dict]:
    """The single input and output of an exported ONNX graph, as Triton sees them."""
    path = Path(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"{path}: expected one input and one output, found {len(inputs)} and {len(graph.output)}")
    return _tensor(inputs[0], path), _tensor(graph.output[0], path)


def model_config(
    name: str,
    platform: str,
    max_batch_size: int,
    inputs: dict,
    outputs: dict,
    preferred: list[int],
    comments: Sequence[str] = (),
) -> str:
    """``config.pbtxt`` text: comment lines, then the model's platform, batch limit, one input, one output,
    dynamic batching.

    Args:
        name: the model's name in the repository.
        platform: Triton's backend platform (``onnxruntime_onnx``, ``tensorrt_plan``).
        max_batch_size: the largest batch the model takes.
        inputs: the input tensor (``name``, ``data_type``, ``dims`` without the batch).
        outputs: the output tensor, likewise.
        preferred: dynamic batching's preferred batch sizes.
        comments: lines written as ``#`` comments at the top (the deployment contract).
    """

    def tensor_block(tensor: dict) -> str:
        dims = ", ".join(str(d) for d in tensor["dims"])
        return f'  {{\n    name: "{tensor["name"]}"\n    data_type: {tensor["data_type"]}\n    dims: [ {dims} ]\n  }}'

    preferred_text = ", ".join(str(size) for size in preferred)
    header = "".join(f"# {line}\n" for line in comments)
    return (
        f"{header}"
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{tensor_block(inputs)}\n]\n"
        f"output [\n{tensor_block(outputs)}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred_text} ]\n"
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n"
        "}\n"
    )


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)


def _replace_dir(staged: Path, target: Path) -> None:
    """Put the finished folder ``staged`` at ``target``, replacing an older one."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staged, target)
        shutil.rmtree(old)
    else:
        os.replace(staged, target)


def model_name(name: str) -> str:
    """A Triton model name (a folder name) from a recipe name: letters, digits, ``_`` and ``-``."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    if not cleaned:
        raise ValueError(f"{name!r} gives an empty Triton model name")
    return cleaned


def write_triton_repository(run_dir: str | Path, repository: str | Path, name: str, version: int = 1) -> dict:
    """Write every Triton-servable artifact of ``run_dir/export.json`` into ``repository``.

    Args:
        run_dir: a run directory whose export stage is complete.
        repository: the model repository (created; models of the same names are replaced).
        name: the base model name (the run's recipe name, usually).
        version: the version folder the files go in.

    Returns ``{model: {"platform", "file", "artifact", "max_batch_size"}}``.
    """
    run_dir, repository = Path(run_dir), Path(repository)
    export_file = run_dir / EXPORT_FILE
    if not export_file.is_file():
        raise FileNotFoundError(f"{export_file} not found: run `gkd-compress export --out {run_dir}` first")
    if version < 1:
        raise ValueError(f"Triton model versions start at 1, got {version}")
    export = read_json(export_file)
    if "contract" not in export:
        raise ValueError(f"{export_file} states no deployment contract: re-run `gkd-compress export --out {run_dir}`")
    comments = ["deployment contract (gkd-compress, export.json `contract`):", *contract_lines(export["contract"])]
    artifacts = export["artifacts"]
    if "onnx/fp32" not in artifacts:
        raise ValueError(f"{export_file}: no onnx/fp32 artifact")
    inputs, outputs = onnx_io(run_dir / artifacts["onnx/fp32"]["file"])
    _, opt_batch, max_batch = export["batch_range"]
    preferred = sorted({opt_batch, max_batch})
    base = model_name(name)
    repository.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, artifact in artifacts.items():
        kind, precision = key.split("/")
        if kind not in MODEL_FILES:
            continue
        if key in export.get("failed", {}):
            log.warning("triton: %s left out, it failed its export checks: %s", key, export["failed"][key])
            continue
        file_name, platform = MODEL_FILES[kind]
        model = base if key == "onnx/fp32" else f"{base}_{kind}_{precision}"
        staged = Path(tempfile.mkdtemp(prefix=f".{model}.", dir=repository))
        try:
            (staged / str(version)).mkdir()
            _link_or_copy(run_dir / artifact["file"], staged / str(version) / file_name)
            config = model_config(model, platform, max_batch, inputs, outputs, preferred, comments)
            (staged / CONFIG_FILE).write_text(config)
            _replace_dir(staged, repository / model)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        written[model] = {
            "platform": platform,
            "file": f"{model}/{version}/{file_name}",
            "artifact": key,
            "max_batch_size": max_batch,
        }
    return written
