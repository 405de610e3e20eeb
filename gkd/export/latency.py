"""Latency harness: warm-up, synchronised timed iterations, percentiles, throughput, peak memory, environment.

Conventions follow trtexec / mmdeploy: untimed warm-up (iterations and/or seconds), then every iteration is
timed on its own with the device synchronised (``torch.cuda.synchronize``) so asynchronous launches are
not mistaken for finished work. Percentiles interpolate linearly (numpy's default). CPU time other
processes took during the timed iterations is recorded (``other_cpus``); a row timed on a busy machine is
marked ``machine_busy`` and warned about.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gkd.export.runtimes.base import Runtime
from gkd.utils.cpu import OtherLoad, available_cpus, machine_busy

log = logging.getLogger("gkd")

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def latency_stats(seconds: Sequence[float], batch_size: int) -> dict[str, float]:
    """Milliseconds per batch (p50 / p90 / p99 / mean / min / max / std) and images per second."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": mean,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "std_ms": float(ms.std()),
        "images_per_s": batch_size * 1e3 / mean,
    }


def _status_mib(field: str) -> float | None:
    match = re.search(rf"{field}:\s+(\d+) kB", _PROC_STATUS.read_text()) if _PROC_STATUS.is_file() else None
    return int(match.group(1)) / 1024 if match else None


class PeakMemory:
    """Peak memory over a span, and the baseline at its start.

    CUDA: torch's allocator (``max_memory_allocated``): ONNX Runtime's and TensorRT's own workspaces are not
    in it. CPU: the process RSS; the kernel's high-water mark (VmHWM) is reset by writing 5 to
    /proc/self/clear_refs (Linux >= 4.0) so the peak belongs to the span; where that is not allowed it is the
    process lifetime peak (ru_maxrss).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated"
        self.baseline_mib = 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            _CLEAR_REFS.write_text("5")
            self.kind = "process_rss_peak"
        except OSError:
            self.kind = "process_rss_peak_lifetime"
        self.baseline_mib = _status_mib("VmRSS") or 0.0

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _status_mib("VmHWM") if self.kind == "process_rss_peak" else None
        return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def measure_latency(
    run: Callable[[], object],
    synchronize: Callable[[], None],
    batch_size: int,
    device: torch.device,
    iterations: int = 20,
    warmup_iterations: int = 5,
    warmup_seconds: float = 0.0,
) -> dict:
    """Time ``run`` (one batch) ``iterations`` times after a warm-up of ``warmup_iterations`` and at least
    ``warmup_seconds``; ``synchronize`` waits for the device after every call.

    Args:
        run: one batch through the model.
        synchronize: waits until the device has finished (a no-op on CPU).
        batch_size: images per call (for images per second).
        device: where ``run`` computes (for peak memory).
        iterations: timed calls.
        warmup_iterations: untimed calls before them.
        warmup_seconds: warm up at least this long, whatever the count.
    """
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    warmup_start, warmed = time.perf_counter(), 0
    while warmed < warmup_iterations or time.perf_counter() - warmup_start < warmup_seconds:
        run()
        synchronize()
        warmed += 1
    warmup_s = time.perf_counter() - warmup_start
    memory = PeakMemory(device)
    memory.reset()
    seconds = []
    others = OtherLoad().start()
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        synchronize()
        seconds.append(time.perf_counter() - start)
    other_cpus = others.stop()
    busy = machine_busy(other_cpus, torch.get_num_threads())
    if busy:
        log.warning(
            "latency measured while other processes used %.1f of %d CPUs: batch %d timings are not reliable",
            other_cpus, available_cpus(), batch_size,
        )  # fmt: skip
    return {
        "batch_size": batch_size,
        "iterations": iterations,
        "warmup_iterations": warmed,
        "warmup_s": round(warmup_s, 3),
        **latency_stats(seconds, batch_size),
        "peak_memory_mib": round(memory.peak_mib(), 1),
        "memory_baseline_mib": round(memory.baseline_mib, 1),
        "memory_kind": memory.kind,
        "other_cpus": None if other_cpus is None else round(other_cpus, 2),
        "machine_busy": busy,
    }


def staged_random_batch(runtime: Runtime, img_size: Sequence[int], batch_size: int, seed: int = 0) -> Any:
    """A seeded random ``(batch_size, 3, H, W)`` batch staged on ``runtime``'s device once (`Runtime.stage`)."""
    return runtime.stage(np.random.default_rng(seed).random((batch_size, 3, *img_size), dtype=np.float32))


def benchmark_runtime(
    runtime: Runtime,
    img_size: Sequence[int],
    batch_size: int,
    iterations: int = 20,
    warmup_iterations: int = 5,
    warmup_seconds: float = 0.0,
    seed: int = 0,
) -> dict:
    """Latency of ``runtime`` on a random batch staged on its device once (no host copies are timed).

    Args:
        runtime: the runtime x precision to time.
        img_size: ``(H, W)`` of the batch.
        batch_size: images per call.
        iterations: timed calls.
        warmup_iterations: untimed calls before them.
        warmup_seconds: warm up at least this long.
        seed: seeds the random batch.
    """
    staged = staged_random_batch(runtime, img_size, batch_size, seed)
    return measure_latency(
        lambda: runtime.run(staged),
        runtime.synchronize,
        batch_size,
        runtime.device,
        iterations,
        warmup_iterations,
        warmup_seconds,
    )


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def _gpu_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return output.strip().splitlines()[0] if output.strip() else None


def _version(module: str) -> str | None:
    try:
        return str(import_module(module).__version__)
    except (ImportError, OSError):  # absent, or present with its shared libraries missing (TensorRT)
        return None


def environment_info() -> dict:
    """Where numbers were measured: CPU, GPU + driver, library versions, threads."""
    gpu = torch.cuda.is_available()
    providers = None
    if _version("onnxruntime") is not None:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "gpu_driver": _gpu_driver() if gpu else None,
        "cuda": torch.version.cuda if gpu else None,
        "versions": {
            name: _version(name) for name in ("torch", "onnx", "onnxruntime", "onnxscript", "timm", "tensorrt")
        },
        "onnxruntime_providers": providers,
    }
