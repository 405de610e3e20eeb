"""What every runtime shares: the `Runtime` interface, and the registry entry that exports and loads one.

``predict(batch)``: float32 numpy ``(B, 3, H, W)`` in ``[0, 1]`` -> float32 numpy logits ``(B, K, H, W)``.
For timing, `Runtime.stage` puts a batch where the runtime reads it (a CUDA tensor, an ONNX Runtime value)
and `Runtime.run` computes device-resident logits, so latency excludes host <-> device copies (as trtexec's
GPU compute time does): full-resolution logits are large and their copy would dominate a small model.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gkd.export.config import ExportConfig
from gkd.export.qdq_mirror import QADTraining
from gkd.models.segmentor import Segmentor

log = logging.getLogger("gkd")


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


@dataclass(frozen=True)
class LoadContext:
    """What a loader may read: the trained model, the run directory and its export summary, the device."""

    segmentor: Segmentor
    img_size: tuple[int, int]
    out_dir: Path
    export_summary: dict
    device: torch.device
    max_batch: int | None
    for_cuda_graph: bool = False  # loaded to be captured as a CUDA graph (`gkd.export.runtimes.cudagraph`)


@dataclass(frozen=True)
class ExportJob:
    """One export: what every exporter reads, and the summary (``artifacts`` / ``skipped`` / ``failed`` /
    ``not_checked``, keyed ``kind/precision``) each records into."""

    prepared: nn.Module  # the fixed-size model (`gkd.export.onnx.prepare_for_export`), on the CPU
    out_dir: Path
    config: ExportConfig
    device: torch.device  # where engines and packages are built
    img_size: tuple[int, int]
    calibration_images: torch.Tensor
    parity_images: torch.Tensor
    summary: dict
    qad: QADTraining | None = None  # export.int8.method qad: fine-tunes the fake-quantized student

    def attempt(self, key: str, make: Callable[[], dict]) -> None:
        """``make()`` recorded as ``summary["artifacts"][key]``; an exception is recorded under ``failed``
        with its message and logged, and the other artifacts still get made."""
        try:
            info = make()
        except Exception as error:  # one artifact that does not build never aborts the stage
            self.summary["failed"][key] = f"{type(error).__name__}: {error}"
            log.error("export: %s failed: %s", key, error)
            return
        self.summary["artifacts"][key] = info
        parity = info.get("parity", {})
        if parity and not parity["passed"]:
            self.summary["failed"][key] = f"parity: {parity['reason']}"
            log.error("export: %s misses parity with PyTorch fp32: %s", key, parity["reason"])


LoadFunction = Callable[[LoadContext, str, Path | None], Runtime]


@dataclass(frozen=True)
class RuntimeEntry:
    """One registered runtime: how its artifact is written, how it loads, where and in which precisions.

    A runtime of a written artifact is offered for each ``kind/precision`` of that kind the export wrote; one
    without (``artifact=None``: the eager model) for each of its ``precisions`` that runs on the device.
    """

    name: str  # the ``runtime`` of its ``runtime/precision`` keys and of a recipe's ``benchmark.runtimes``
    load: LoadFunction  # (context, precision, artifact path or None) -> the loaded runtime; raises if it cannot
    precisions: tuple[str, ...]
    artifact: str | None = None  # the kind of artifact it runs (``onnx``); None: the segmentor itself
    files: Mapping[str, str] = field(default_factory=dict)  # that artifact's file per precision
    exporter: Callable[[ExportJob], None] | None = None  # writes the artifact; None: another entry's, or none
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types it runs on
    cuda_precisions: tuple[str, ...] = ()  # of ``precisions``, those that run on CUDA only
    wraps: str | None = None  # the entry whose runtime this one runs another way (a CUDA graph of it)
    # why the optional library it runs in is not installed (its rows are then ``not_checked``), or None
    library_missing: Callable[[], str | None] | None = None

    @classmethod
    def of_artifact(
        cls,
        name: str,
        artifact: str,
        files: Mapping[str, str],
        load: LoadFunction,
        exporter: Callable[[ExportJob], None] | None,
        **settings: Any,
    ) -> RuntimeEntry:
        """An entry running an artifact of kind ``artifact`` in each precision ``files`` names (more fields in
        ``settings``)."""
        return cls(name, load, tuple(files), artifact, files, exporter, **settings)

    def offered(self, device: torch.device) -> tuple[str, ...]:
        """Its precisions that run on ``device``."""
        return tuple(p for p in self.precisions if device.type == "cuda" or p not in self.cuda_precisions)


def artifact_files(extension: str, precisions: Sequence[str]) -> dict[str, str]:
    """``{precision: file}``: ``model.<extension>`` for fp32, ``model.<precision>.<extension>`` otherwise."""
    return {p: f"model.{extension}" if p == "fp32" else f"model.{p}.{extension}" for p in precisions}
