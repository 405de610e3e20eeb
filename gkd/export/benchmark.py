"""The benchmark: latency of every runtime x precision that runs here, and each one's accuracy against PyTorch
fp32 (logit parity on the export's parity images, mIoU per target domain). Runtimes are keyed
``runtime/precision`` (``torch/fp32``, ``onnxruntime/int8``, ...).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gkd.evaluate.inference import frames_logits, slide_windows
from gkd.export.interleaved import PAIRED_NOTE, time_interleaved
from gkd.export.latency import benchmark_runtime, environment_info, measure_latency, staged_random_batch
from gkd.export.parity import compare_logits, judge
from gkd.export.precisions import ParityConfig
from gkd.export.runtimes import RUNTIMES, Runtime, RuntimeName, TorchRuntime, load_runtime, runtime_loaders
from gkd.export.stage import PARITY_FILE
from gkd.models.segmentor import Segmentor

log = logging.getLogger("gkd")

BENCHMARK_NOTES = {
    "latency": "per batch, input already on the device, logits left there (no host copies); device synchronised "
    "after every iteration; percentiles interpolate linearly",
    "memory": "CUDA: torch allocator peak (ONNX Runtime / TensorRT workspaces not included); CPU: process RSS peak",
    "accuracy": "mIoU per domain vs torch/fp32; failed = drop above the precision's tolerance on any domain",
    "frame_latency": "one frame of the dataset's size from host memory to logits at that size on the host, through "
    "the evaluation path the mIoU used (slide: every window, batched, plus the stitching; whole: resize, model, "
    "resize back), host copies included; frames_per_s = 1000 / mean_ms",
    "paired": f"batch 1, every runtime whose batch-1 latency ran, loaded together: {PAIRED_NOTE}",
}
PAIRED_REFERENCES = ("onnxruntime/fp32", "torch/fp32")


@dataclass(frozen=True)
class FramePath:
    """The evaluation path of one whole frame (`gkd.evaluate.inference.frames_logits`), for `frame_latency`."""

    size: tuple[int, int]  # (H, W) of the frame: the source_val dataset's first image
    mode: str  # ``whole`` or ``slide``
    stride: tuple[int, int]  # slide: window stride
    batch_size: int  # slide: windows per model call

    def describe(self, img_size: tuple[int, int]) -> dict:
        """The path as ``benchmark.json`` records it (``windows``: model inputs per frame)."""
        windows = len(slide_windows(self.size, img_size, self.stride)) if self.mode == "slide" else 1
        return {
            "mode": self.mode,
            "frame_size": list(self.size),
            "window": list(img_size),
            **({"stride": list(self.stride), "windows_per_call": self.batch_size} if self.mode == "slide" else {}),
            "windows": windows,
        }


class BenchmarkConfig(BaseModel):
    """Latency of every available runtime x precision x batch size, and each artifact's mIoU vs PyTorch fp32."""

    model_config = ConfigDict(extra="forbid")

    batch_sizes: tuple[int, ...] = Field((1, 8), min_length=1, description="batch sizes to time")
    warmup_iterations: int = Field(5, ge=0, description="untimed iterations before timing")
    warmup_seconds: float = Field(0.0, ge=0, description="also warm up for at least this long (trtexec uses 0.2 s)")
    iterations: int = Field(20, ge=5, description="timed iterations per runtime and batch size")
    runtimes: Literal["auto"] | list[RuntimeName] = Field(
        "auto", description="'auto' = every runtime that loads here, or a list of runtime names"
    )
    accuracy: bool = Field(True, description="evaluate every artifact's mIoU on every target domain")
    tolerance_fp32: float = Field(0.1, ge=0, description="mIoU points an fp32 artifact may lose against PyTorch fp32")
    tolerance_fp16: float = Field(
        0.5, ge=0, description="mIoU points an fp16/bf16 artifact may lose against PyTorch fp32"
    )
    tolerance_int8: float = Field(1.5, ge=0, description="mIoU points an int8 artifact may lose against PyTorch fp32")

    @model_validator(mode="after")
    def _positive_batches(self) -> BenchmarkConfig:
        if any(size < 1 for size in self.batch_sizes):
            raise ValueError(f"batch_sizes must be >= 1, got {self.batch_sizes}")
        return self

    def tolerance(self, precision: str) -> float:
        """mIoU tolerance for an artifact of ``precision`` (bf16 counts as fp16)."""
        tolerances = {
            "fp32": self.tolerance_fp32,
            "fp16": self.tolerance_fp16,
            "bf16": self.tolerance_fp16,
            "int8": self.tolerance_int8,
        }
        return tolerances[precision]


def _not_checked(loaders: dict, device: torch.device) -> dict[str, str]:
    """``{runtime key: why}`` for the rows whose optional library is not installed (ONNX Runtime on a bare
    install). A runtime that needs another device first is left to its loader, which says so, installed or not."""
    missing = {
        entry.name: entry.library_missing()
        for entry in RUNTIMES
        if entry.library_missing is not None and device.type in entry.devices
    }
    return {key: missing[key.split("/")[0]] for key in loaders if missing.get(key.split("/")[0])}


def benchmark_artifacts(
    segmentor: Segmentor,
    img_size: tuple[int, int],
    out_dir: Path,
    export_summary: dict,
    config: BenchmarkConfig,
    device: torch.device,
    evaluate: Callable[[Callable[[np.ndarray], np.ndarray]], dict[str, float]] | None,
    frame: FramePath | None = None,
) -> dict:
    """Accuracy and latency of every runtime x precision that runs here.

    Accuracy: ``evaluate(predict)`` gives ``{domain: mIoU}`` for each runtime; one that loses more than its
    precision's tolerance against PyTorch fp32 on any domain, misses logit parity on the export's parity
    images (the export's per-precision tolerances), or fails while running is ``failed``, with its reasons
    under ``failures``; the summary is then not ``ok`` (nor when an export artifact failed). Latency: each
    batch size of ``config.batch_sizes``. Without ONNX Runtime its runtimes are listed under ``not_checked``.

    Args:
        segmentor: the trained model (PyTorch, and the fp32 reference).
        img_size: ``(H, W)`` of the artifacts.
        out_dir: the run directory holding them.
        export_summary: what the export stage wrote (artifacts, skipped ones, parity tolerances).
        config: the recipe's benchmark block (runtimes, batch sizes, iterations, accuracy).
        device: where to run.
        evaluate: ``evaluate(predict) -> {domain: mIoU}``; ``None`` measures latency only.
        frame: the evaluation path of a whole frame, timed per runtime as ``frame_latency`` next to the model's
            ``latency`` at its input size; ``None`` times the model only.
    """
    out_dir, img_size = Path(out_dir), (int(img_size[0]), int(img_size[1]))
    loaders, skipped = runtime_loaders(segmentor, img_size, out_dir, export_summary, device, config.runtimes)
    not_checked = _not_checked(loaders, device)
    loaders = {key: loader for key, loader in loaders.items() if key not in not_checked}
    parity_path = out_dir / export_summary.get("parity_images", PARITY_FILE)
    parity = np.load(parity_path) if parity_path.is_file() else None
    references = {
        **_fp32_reference(TorchRuntime(segmentor, img_size, "fp32", device), parity, evaluate, config.accuracy),
        "tolerances": ParityConfig(**export_summary.get("parity_tolerances", {})),
    }
    results: dict[str, dict] = {}
    # One runtime loaded at a time, so each one's peak memory is its own (plus the caller's segmentor).
    for key, loader in loaders.items():
        runtime, why = load_runtime(loader)
        if runtime is None:
            skipped[key] = why
            continue
        results[key] = _measure_runtime(key, runtime, parity, references, config, img_size, evaluate)
        if frame is not None:
            results[key]["frame_latency"] = frame_latency(runtime, img_size, frame, config)
        del runtime
        _release_memory(device)
        log.info("benchmark: %s done", key)
    summary = _benchmark_summary(results, references, export_summary, config, device, img_size, skipped, not_checked)
    summary["paired"] = paired_latency(loaders, results, img_size, config, device)
    return {**summary, "frame": frame.describe(img_size)} if frame is not None else summary


def paired_latency(
    loaders: dict, results: dict, img_size: tuple[int, int], config: BenchmarkConfig, device: torch.device
) -> dict:
    """Batch-1 latency of the runtimes whose batch-1 timing ran, loaded together and timed interleaved
    (`time_interleaved`, ``config.iterations`` rounds) against onnxruntime/fp32, else torch/fp32, else the first;
    runtimes that do not load again are listed under ``skipped``, a failure is recorded as ``error``."""
    runtimes, skipped = _load_again(loaders, results)
    reference = next((key for key in PAIRED_REFERENCES if key in runtimes), next(iter(runtimes), None))
    try:
        paired = _time_paired(runtimes, reference, img_size, config) if reference else {"error": "no runtime ran"}
    except Exception as error:  # recorded like a batch size that does not run
        paired = {"error": f"{type(error).__name__}: {error}"}
    del runtimes
    _release_memory(device)
    return {**paired, "skipped": skipped}


def _load_again(loaders: dict, results: dict) -> tuple[dict[str, Runtime], dict[str, str]]:
    """The runtimes whose batch-1 latency ran, loaded again, and ``{key: why not}`` for the others."""
    runtimes, skipped = {}, {}
    for key, entry in results.items():
        if "error" in entry["latency"].get("1", {}):
            skipped[key] = "its batch-1 latency failed"
            continue
        runtime, why = load_runtime(loaders[key])
        if runtime is None:
            skipped[key] = why
        else:
            runtimes[key] = runtime
    return runtimes, skipped


def _time_paired(
    runtimes: dict[str, Runtime], reference: str, img_size: tuple[int, int], config: BenchmarkConfig
) -> dict:
    """`time_interleaved` over one staged random batch of 1 per runtime, each call synchronised."""

    def synchronized(runtime: Runtime) -> Callable[[], None]:
        staged = staged_random_batch(runtime, img_size, 1)
        return lambda: (runtime.run(staged), runtime.synchronize())

    runs = {key: synchronized(runtime) for key, runtime in runtimes.items()}
    return time_interleaved(runs, config.iterations, config.warmup_iterations, reference)


def _benchmark_summary(
    results: dict,
    references: dict,
    export_summary: dict,
    config: BenchmarkConfig,
    device: torch.device,
    img_size: tuple[int, int],
    skipped: dict,
    not_checked: dict,
) -> dict:
    """`benchmark_artifacts`' summary of the measured runtimes."""
    failed = sorted(key for key, entry in results.items() if entry["failed"])
    return {
        "ok": not failed and not export_summary.get("failed"),
        "failed": failed,
        "export_failed": export_summary.get("failed", {}),
        "reference": "torch/fp32",
        "reference_miou": references["miou"],
        "device": str(device),
        "img_size": list(img_size),
        "config": config.model_dump(mode="json"),
        "environment": environment_info(),
        "runtimes": results,
        "skipped": skipped,
        "not_checked": not_checked,
        "notes": BENCHMARK_NOTES,
    }


def _release_memory(device: torch.device) -> None:
    """Free what the last runtime held, so the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fp32_reference(
    reference: Runtime,
    parity: np.ndarray | None,
    evaluate: Callable[[Callable[[np.ndarray], np.ndarray]], dict[str, float]] | None,
    accuracy: bool,
) -> dict:
    """PyTorch fp32's logits on the parity images and, with ``accuracy``, its mIoU per domain: what every
    runtime is held to."""
    return {
        "logits": reference.predict(parity) if parity is not None else None,
        "miou": evaluate(reference.predict) if evaluate is not None and accuracy else None,
    }


def _measure_runtime(
    key: str,
    runtime: Runtime,
    parity: np.ndarray | None,
    references: dict,
    config: BenchmarkConfig,
    img_size: tuple[int, int],
    evaluate: Callable[[Callable[[np.ndarray], np.ndarray]], dict[str, float]] | None,
) -> dict:
    """One runtime's parity, mIoU per domain and latency per batch size; failures recorded, never raised."""
    entry = {**runtime.info, "failures": []}
    try:
        if references["logits"] is not None:
            tolerance = references["tolerances"].tolerance(runtime.precision)
            entry["parity"] = judge(compare_logits(references["logits"], runtime.predict(parity)), tolerance)
            if not entry["parity"]["passed"]:
                entry["failures"].append(f"parity: {entry['parity']['reason']}")
        if references["miou"] is not None:
            reference_miou = references["miou"]
            miou = reference_miou if key == "torch/fp32" else evaluate(runtime.predict)
            drops = {domain: reference_miou[domain] - miou[domain] for domain in reference_miou}
            tolerance = config.tolerance(runtime.precision)
            entry.update(miou=miou, miou_drop=drops, tolerance=tolerance)
            if max(drops.values()) > tolerance:
                entry["failures"].append(f"loses {max(drops.values()):.2f} mIoU (tolerance {tolerance:.2f})")
    except Exception as error:  # a runtime that breaks while running is a failed row, the others still run
        entry["failures"].append(f"{type(error).__name__}: {error}")
    entry["latency"] = {}
    for batch_size in config.batch_sizes:
        try:
            entry["latency"][str(batch_size)] = benchmark_runtime(
                runtime, img_size, batch_size, config.iterations, config.warmup_iterations, config.warmup_seconds
            )
        except Exception as error:  # e.g. a batch outside an engine's profile: recorded, the rest still runs
            entry["latency"][str(batch_size)] = {"error": f"{type(error).__name__}: {error}"}
    entry["failed"] = bool(entry["failures"])
    for reason in entry["failures"]:
        log.error("benchmark: %s failed: %s", key, reason)
    return entry


def frame_latency(runtime: Runtime, img_size: tuple[int, int], frame: FramePath, config: BenchmarkConfig) -> dict:
    """Latency of one whole frame through the evaluation path (`FramePath`), host to host; errors recorded."""
    image = torch.from_numpy(np.random.default_rng(0).random((3, *frame.size), dtype=np.float32))

    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runtime.predict(images.numpy()))

    try:
        stats = measure_latency(
            lambda: frames_logits(predict, [image], img_size, frame.mode, frame.stride, frame.batch_size),
            runtime.synchronize,
            1,
            runtime.device,
            config.iterations,
            config.warmup_iterations,
            config.warmup_seconds,
        )
    except Exception as error:  # recorded like a batch size that does not run
        return {**frame.describe(img_size), "error": f"{type(error).__name__}: {error}"}
    frames_per_s = stats.pop("images_per_s")
    return {**frame.describe(img_size), **stats, "frames_per_s": frames_per_s}
