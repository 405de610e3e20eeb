"""The registry: every runtime an exported segmentor runs in, as data. Adding one = its module + one line here.

Order matters: exporters run in it (the ONNX files first: engines are built from them) and the runtimes of an
artifact are offered in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from gkd.export.runtimes.aoti import AOTI
from gkd.export.runtimes.base import LoadContext, Runtime, RuntimeEntry
from gkd.export.runtimes.cudagraph import cuda_graph_of
from gkd.export.runtimes.onnxruntime import ONNXRUNTIME, ONNXRUNTIME_TRT
from gkd.export.runtimes.pytorch import TORCH
from gkd.export.runtimes.tensorrt import TENSORRT
from gkd.models.segmentor import Segmentor

RUNTIMES: tuple[RuntimeEntry, ...] = (
    TORCH,
    cuda_graph_of(TORCH),
    ONNXRUNTIME,
    ONNXRUNTIME_TRT,
    TENSORRT,
    AOTI,
    cuda_graph_of(AOTI),
)
RUNTIME_NAMES: tuple[str, ...] = tuple(entry.name for entry in RUNTIMES)
RuntimeName = Literal[RUNTIME_NAMES]  # a recipe's `benchmark.runtimes`

Loader = Callable[[], Runtime]


def _load(entry: RuntimeEntry, context: LoadContext, precision: str, path: Path | None) -> Runtime:
    """``entry``'s runtime, or an exception saying why it does not run here."""
    if context.device.type not in entry.devices:
        needs = " or ".join(device.upper() for device in entry.devices)
        raise RuntimeError(f"{entry.name} needs a {needs} device; the device is {context.device.type}")
    return entry.load(context, precision, path)


def _sources(context: LoadContext, skipped: dict[str, str]) -> dict[str, tuple[RuntimeEntry, str, Path | None]]:
    """``{runtime/precision: (entry, precision, artifact path)}`` of every runtime offered here, in the order
    they are timed: the eager model, each written artifact's runtimes, then the other runtimes replayed."""
    device = context.device
    sources = {
        f"{entry.name}/{precision}": (entry, precision, None)
        for entry in RUNTIMES
        if entry.artifact is None and entry.wraps is None and device.type in entry.devices
        for precision in entry.offered(device)
    }
    for key, artifact in context.export_summary.get("artifacts", {}).items():
        kind, precision = key.split("/")
        for entry in (entry for entry in RUNTIMES if entry.artifact == kind and entry.wraps is None):
            if artifact.get("device", device.type) != device.type:  # a package compiled for one device type
                skipped[f"{entry.name}/{precision}"] = (
                    f"the package was compiled for {artifact['device']}, the device is {device.type}"
                )
            else:  # listed even where it cannot run: its loader says why
                sources[f"{entry.name}/{precision}"] = (entry, precision, context.out_dir / artifact["file"])
    for entry in (entry for entry in RUNTIMES if entry.wraps is not None and device.type in entry.devices):
        for _, precision, path in [source for source in sources.values() if source[0].name == entry.wraps]:
            sources[f"{entry.name}/{precision}"] = (entry, precision, path)
    return sources


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
    export stage skipped (``export_summary["skipped"]``) are reported with the export's reason. A runtime of
    a written artifact is listed wherever it is asked for; the others (the eager model, CUDA graphs) only where
    they run. A loader raises when its runtime does not load (missing provider, library, device); see
    `load_runtime`.

    Args:
        segmentor: the trained model (the torch runtimes).
        img_size: ``(H, W)`` of the artifacts.
        out_dir: the run directory holding them.
        export_summary: what the export stage wrote.
        device: where to run.
        names: ``auto`` (every runtime) or the runtimes to keep.
    """
    wanted = set(RUNTIME_NAMES if names == "auto" else names)
    max_batch = export_summary.get("batch_range", [None])[-1]
    context = LoadContext(segmentor, tuple(img_size), Path(out_dir), export_summary, device, max_batch)
    # Export skips only engines and packages, whose kinds ("tensorrt", "aoti") are also their runtimes' names.
    skipped = {key: why for key, why in export_summary.get("skipped", {}).items() if key.split("/")[0] in wanted}
    sources = _sources(context, skipped)
    loaders: dict[str, Loader] = {
        key: partial(_load, entry, context, precision, path)
        for key, (entry, precision, path) in sources.items()
        if entry.name in wanted
    }
    return loaders, {key: why for key, why in skipped.items() if key.split("/")[0] in wanted}


def load_runtime(loader: Loader) -> tuple[Runtime | None, str | None]:
    """``(runtime, None)``, or ``(None, why)`` when it does not load here."""
    try:
        return loader(), None
    except Exception as error:  # a runtime that does not load is reported, never fatal
        return None, f"{type(error).__name__}: {error}"
