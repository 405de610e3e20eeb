"""``gkd-compress engine``: a TensorRT engine built from a run's ONNX file on the machine that serves it (a
Jetson, a Triton host), with the export's optimisation profile, and checked against the fp32 ONNX model in ONNX
Runtime on the run's parity images.

A serialized engine only loads with the TensorRT version, and runs best on the GPU, that built it: the export's
own engines serve on the training machine, this command makes one for anywhere else. The network is strongly
typed (`gkd.export.tensorrt`), so the precision comes from the ONNX graph: ``fp16`` builds from
``model.fp16.onnx``, ``int8`` from ``model.int8.onnx``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gkd.export.config import ExportConfig
from gkd.export.latency import environment_info
from gkd.export.onnx import INPUT_NAME, onnx_session
from gkd.export.parity import compare_logits, judge
from gkd.export.precisions import ParityConfig
from gkd.export.runtimes.onnxruntime import ONNX_FILES
from gkd.export.runtimes.tensorrt import ENGINE_FILES, TIMING_CACHE_FILE
from gkd.export.stage import PARITY_FILE
from gkd.export.tensorrt import TensorRTEngine, build_engine
from gkd.rundir import EXPORT_FILE
from gkd.utils.errors import MissingDependencyError
from gkd.utils.io import read_json, write_json

log = logging.getLogger("gkd")

ENGINE_PRECISIONS = tuple(ENGINE_FILES)
ENGINE_JSON = "engine.json"
INSTALL_HINT = (
    "pip install the TensorRT wheel of this machine's CUDA (tensorrt-cu12 for CUDA 12, tensorrt-cu13 for CUDA 13; "
    "JetPack ships its own), or run it in the NGC TensorRT container of the Triton image's release "
    "(nvcr.io/nvidia/tensorrt:<yy.mm>-py3) so the engine matches the TensorRT that serves it"
)


def parse_batch_range(text: str) -> tuple[int, int, int]:
    """``"1,4,8"`` -> ``(1, 4, 8)``: min, opt, max batch with ``1 <= min <= opt <= max``."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"batch range {text!r}: expected MIN,OPT,MAX integers with 1 <= MIN <= OPT <= MAX")
    return values


def missing_dependency() -> str | None:
    """What this machine lacks to build and check an engine (TensorRT, a CUDA device, ONNX Runtime), or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as error:
        return f"TensorRT is not installed ({error}): {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return f"no CUDA device is visible, and a TensorRT engine is built on the GPU that runs it: {INSTALL_HINT}"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "ONNX Runtime is not installed (the engine is checked against it): pip install onnxruntime"
    return None


def _predict_in_profile(engine: TensorRTEngine, images: np.ndarray, low: int, high: int) -> np.ndarray:
    """Logits of ``images`` in chunks of at most ``high``; a chunk below ``low`` is padded by repeating it."""
    outputs = []
    for start in range(0, len(images), high):
        chunk = images[start : start + high]
        padded = np.concatenate([chunk] * -(-low // len(chunk)))[: max(low, len(chunk))]
        logits = engine(torch.from_numpy(padded).to(engine.device)).float().cpu().numpy()
        outputs.append(logits[: len(chunk)])
    return np.concatenate(outputs)


def _require_onnx(run_dir: Path, export: dict, precisions: Sequence[str]) -> None:
    """Raise `FileNotFoundError` unless the run's export wrote the ONNX file of each of ``precisions``."""
    for precision in precisions:
        key = f"onnx/{precision}"
        if key not in export["artifacts"] or not (run_dir / export["artifacts"][key]["file"]).is_file():
            raise FileNotFoundError(
                f"{run_dir}: no {key} artifact to build from: add {precision} to export.precisions and "
                f"re-run `gkd-compress export --out {run_dir}`"
            )


def build_run_engine(
    run_dir: str | Path,
    precision: str = "fp16",
    batch_range: Sequence[int] | None = None,
    out: str | Path | None = None,
    workspace_mib: int = ExportConfig().workspace_mib,
) -> dict:
    """Build ``out`` from the run's ONNX file of ``precision`` on this machine's GPU, check it, write ``engine.json``.

    Args:
        run_dir: a run directory whose export stage is complete (``export.json``, the ONNX files, parity images).
        precision: ``fp16`` or ``int8``: the ONNX graph the engine is built from.
        batch_range: ``(min, opt, max)`` batch of the profile; ``None``: the export's ``batch_range``.
        out: the engine file; ``None``: ``RUN_DIR/engines/model.<precision>.plan``. ``engine.json`` goes beside it.
        workspace_mib: TensorRT's workspace memory pool limit.

    Returns ``engine.json``'s entry: the build (TensorRT version, profile, time), the GPU and the parity.
    Raises `MissingDependencyError` without TensorRT, a CUDA device or ONNX Runtime; ``ValueError`` /
    ``FileNotFoundError`` for a precision, batch range or run directory that cannot give an engine.
    """
    run_dir = Path(run_dir)
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"precision {precision!r}: an engine is built in {', '.join(ENGINE_PRECISIONS)}")
    export_file = run_dir / EXPORT_FILE
    if not export_file.is_file():
        raise FileNotFoundError(f"{export_file} not found: run `gkd-compress export --out {run_dir}` first")
    export = read_json(export_file)
    batch_range = parse_batch_range(",".join(str(b) for b in (batch_range or export["batch_range"])))
    _require_onnx(run_dir, export, ("fp32", precision))
    missing = missing_dependency()
    if missing:
        raise MissingDependencyError(missing)
    out = Path(out) if out else run_dir / "engines" / f"model.{precision}.plan"
    out.parent.mkdir(parents=True, exist_ok=True)
    img_size = tuple(export["img_size"])
    source = run_dir / ONNX_FILES[precision]
    build = build_engine(source, out, precision, img_size, batch_range, workspace_mib, out.parent / TIMING_CACHE_FILE)
    images = np.load(run_dir / export.get("parity_images", PARITY_FILE)).astype(np.float32)
    reference = onnx_session(run_dir / ONNX_FILES["fp32"]).run(None, {INPUT_NAME: images})[0]
    engine = TensorRTEngine(out, torch.device("cuda"))
    logits = _predict_in_profile(engine, images, batch_range[0], batch_range[2])
    tolerance = ParityConfig(**export.get("parity_tolerances", {})).tolerance(precision)
    entry = {
        **build,
        "engine": str(out),
        "img_size": list(img_size),
        "gpu": torch.cuda.get_device_name(),
        "parity": {
            "reference": f"{ONNX_FILES['fp32']} in ONNX Runtime (CPU)",
            "images": len(images),
            **judge(compare_logits(reference, logits), tolerance),
        },
        "environment": environment_info(),
    }
    summary_file = out.parent / ENGINE_JSON
    engines = read_json(summary_file) if summary_file.is_file() else {}
    write_json(summary_file, {**engines, out.name: entry})
    log.info("engine: %s built in %.1f s; parity %s", out, build["build_s"], entry["parity"]["passed"])
    return entry
