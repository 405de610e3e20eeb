"""The export and benchmark stages: JSON-able summaries of what was written, how it compares, how fast it runs.

Artifacts are keyed ``kind/precision`` (``onnx/fp32``, ``onnx/fp16``, ``onnx/int8``, ``tensorrt/fp16``,
``tensorrt/int8``, ``aoti/fp32``); runtimes ``runtime/precision`` (``torch/fp32``, ``onnxruntime/int8``, ...).
"""

from __future__ import annotations

import gc
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gkd.export.aoti import compile_aoti, load_aoti
from gkd.export.config import BenchmarkConfig, ExportConfig
from gkd.export.latency import benchmark_runtime, environment_info
from gkd.export.onnx import (
    INPUT_NAME,
    OUTPUT_NAME,
    ParityError,
    baked_size,
    check_parity,
    compare_logits,
    export_onnx,
    half_precision,
    prepare_for_export,
)
from gkd.export.quantize import quantize_int8
from gkd.export.runtimes import TorchRuntime, load_runtime, runtime_loaders
from gkd.export.tensorrt import build_engine, tensorrt_unavailable
from gkd.models.segmentor import Segmentor
from gkd.report.pareto import pareto_plot
from gkd.utils.io import atomic_path

log = logging.getLogger("gkd")

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
ENGINE_FILES = {"fp16": "model.fp16.engine", "int8": "model.int8.engine"}
AOTI_FILE = "model.pt2"
PARITY_FILE = "parity_images.npy"
TIMING_CACHE_FILE = "tensorrt.timing.cache"
PARETO_FILE = "pareto.png"
BENCHMARK_NOTES = {
    "latency": "per batch, input already on the device, logits left there (no host copies); device synchronised "
    "after every iteration; percentiles interpolate linearly",
    "memory": "CUDA: torch allocator peak (ONNX Runtime / TensorRT workspaces not included); CPU: process RSS peak",
    "accuracy": "mIoU per domain vs torch/fp32; failed = drop above the precision's tolerance on any domain",
}
FP16_NUMERICS = (
    "fp16 weights and activations; LayerNorm computed in fp32 between explicit Casts; softmax in fp16 "
    "(q and k pre-scaled by the exporter); float32 input and logits"
)


def _save_parity_images(path: Path, images: torch.Tensor) -> None:
    with atomic_path(path) as temp, temp.open("wb") as handle:
        np.save(handle, images.float().cpu().numpy())


def export_artifacts(
    segmentor: Segmentor,
    img_size: tuple[int, int],
    out_dir: Path,
    config: ExportConfig,
    calibration_images: torch.Tensor,
    parity_images: torch.Tensor,
    device: torch.device,
) -> dict:
    """Write every artifact ``config`` asks for to ``out_dir`` and check each against PyTorch fp32.

    ONNX files are exported from a CPU copy and checked in ONNX Runtime's CPU provider (fp32 must match
    within ``config.parity_atol`` or `ParityError` is raised; fp16 / int8 record their agreement). Engines
    and the AOTInductor package are built on ``device``; missing TensorRT or GPU puts the engines under
    ``skipped`` with the reason, a build that fails goes under ``failed``; nothing else is held up.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img_size = (int(img_size[0]), int(img_size[1]))
    batch_range = list(config.batch_range)
    prepared = prepare_for_export(segmentor, img_size).to("cpu")
    summary: dict = {
        "img_size": list(img_size),
        "encoder_input_size": list(baked_size(prepared, img_size)),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, *img_size], "range": [0.0, 1.0]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", "classes", *img_size]},
        "opset": config.opset,
        "batch_range": batch_range,
        "parity_images": PARITY_FILE,
        "artifacts": {},
        "skipped": {},
        "failed": {},
        "environment": environment_info(),
    }
    artifacts = summary["artifacts"]
    _save_parity_images(out_dir / PARITY_FILE, parity_images)

    fp32_path = out_dir / ONNX_FILES["fp32"]
    artifacts["onnx/fp32"] = export_onnx(prepared, fp32_path, img_size, config.opset, batch_range)
    artifacts["onnx/fp32"]["parity"] = check_parity(prepared, fp32_path, parity_images, config.parity_atol)
    if "fp16" in config.precisions:
        path = out_dir / ONNX_FILES["fp16"]
        artifacts["onnx/fp16"] = export_onnx(half_precision(prepared), path, img_size, config.opset, batch_range)
        artifacts["onnx/fp16"]["numerics"] = FP16_NUMERICS
        artifacts["onnx/fp16"]["parity"] = check_parity(prepared, path, parity_images, atol=None)
    if "int8" in config.precisions:
        path = out_dir / ONNX_FILES["int8"]
        calibration = calibration_images[: config.calibration_images]
        artifacts["onnx/int8"] = quantize_int8(fp32_path, path, calibration, config.calibration_method)
        artifacts["onnx/int8"]["parity"] = check_parity(prepared, path, parity_images, atol=None)
    log.info("export: ONNX %s written to %s", ", ".join(config.precisions), out_dir)

    for precision in (p for p in ("fp16", "int8") if p in config.precisions):
        key = f"tensorrt/{precision}"
        reason = "disabled (export.tensorrt: false)" if not config.tensorrt else tensorrt_unavailable(device)
        if reason:
            summary["skipped"][key] = reason
            continue
        try:
            artifacts[key] = build_engine(
                out_dir / ONNX_FILES[precision],
                out_dir / ENGINE_FILES[precision],
                precision,
                img_size,
                batch_range,
                config.workspace_mib,
                out_dir / TIMING_CACHE_FILE,
            )
        except Exception as error:  # an engine that does not build is reported; the other artifacts stand
            summary["failed"][key] = f"{type(error).__name__}: {error}"
            log.error("export: %s failed: %s", key, error)

    if not config.aoti:
        summary["skipped"]["aoti/fp32"] = "disabled (export.aoti: false)"
    else:
        try:
            artifacts["aoti/fp32"] = compile_aoti(prepared, out_dir / AOTI_FILE, img_size, batch_range, device)
        except Exception as error:  # e.g. no C++ compiler or Triton on this machine
            summary["failed"]["aoti/fp32"] = f"{type(error).__name__}: {error}"
            log.error("export: AOTInductor failed: %s", error)
        else:
            artifacts["aoti/fp32"]["parity"] = _aoti_parity(
                prepared, out_dir / AOTI_FILE, parity_images, device, config
            )
    for key, reason in summary["skipped"].items():
        log.warning("export: skipped %s: %s", key, reason)
    return summary


@torch.no_grad()
def _aoti_parity(
    prepared: torch.nn.Module, path: Path, images: torch.Tensor, device: torch.device, config: ExportConfig
) -> dict:
    reference = prepared.to(device)(images.to(device, torch.float32)).cpu().numpy()
    candidate = load_aoti(path)(images.to(device, torch.float32)).cpu().numpy()
    result = compare_logits(reference, candidate)
    if not result["max_abs_diff"] <= config.parity_atol:
        raise ParityError(f"{path.name}: max |logit difference| {result['max_abs_diff']:.3g} > {config.parity_atol:g}")
    return result


def _pareto_points(results: dict[str, dict], batch_size: int) -> list[dict]:
    points = []
    for key, entry in results.items():
        latency = entry.get("latency", {}).get(str(batch_size), {})
        if "miou" in entry and "p50_ms" in latency:
            points.append(
                {"label": key, "latency_ms": latency["p50_ms"], "miou": statistics.fmean(entry["miou"].values())}
            )
    return points


def benchmark_artifacts(
    segmentor: Segmentor,
    img_size: tuple[int, int],
    out_dir: Path,
    export_summary: dict,
    config: BenchmarkConfig,
    device: torch.device,
    evaluate: Callable[[Callable[[np.ndarray], np.ndarray]], dict[str, float]] | None,
) -> dict:
    """Accuracy and latency of every runtime x precision that runs here.

    Accuracy: ``evaluate(predict)`` gives ``{domain: mIoU}`` for each runtime; one that loses more than its
    precision's tolerance against PyTorch fp32 on any domain is ``failed`` and the summary is not ``ok``
    (nor is it when an export artifact failed to build). Argmax agreement with PyTorch fp32 on the export's
    parity images is recorded for every runtime. Latency: each batch size of ``config.batch_sizes``.
    """
    out_dir = Path(out_dir)
    img_size = (int(img_size[0]), int(img_size[1]))
    loaders, skipped = runtime_loaders(segmentor, img_size, out_dir, export_summary, device, config.runtimes)
    reference = TorchRuntime(segmentor, img_size, "fp32", device)
    parity_path = out_dir / export_summary.get("parity_images", PARITY_FILE)
    parity = np.load(parity_path) if parity_path.is_file() else None
    reference_logits = reference.predict(parity) if parity is not None else None
    reference_miou = evaluate(reference.predict) if evaluate is not None and config.accuracy else None
    del reference

    results: dict[str, dict] = {}
    # One runtime loaded at a time, so each one's peak memory is its own (plus the caller's segmentor).
    for key, loader in loaders.items():
        runtime, why = load_runtime(loader)
        if runtime is None:
            skipped[key] = why
            continue
        entry = dict(runtime.info)
        if reference_logits is not None:
            entry["parity"] = compare_logits(reference_logits, runtime.predict(parity))
        if reference_miou is not None:
            miou = reference_miou if key == "torch/fp32" else evaluate(runtime.predict)
            drops = {domain: reference_miou[domain] - miou[domain] for domain in reference_miou}
            tolerance = config.tolerance(runtime.precision)
            entry.update(miou=miou, miou_drop=drops, tolerance=tolerance, failed=max(drops.values()) > tolerance)
            if entry["failed"]:
                log.error("benchmark: %s loses %.2f mIoU (tolerance %.2f)", key, max(drops.values()), tolerance)
        entry["latency"] = {}
        for batch_size in config.batch_sizes:
            try:
                entry["latency"][str(batch_size)] = benchmark_runtime(
                    runtime, img_size, batch_size, config.iterations, config.warmup_iterations, config.warmup_seconds
                )
            except Exception as error:  # e.g. a batch outside an engine's profile: recorded, the rest still runs
                entry["latency"][str(batch_size)] = {"error": f"{type(error).__name__}: {error}"}
        results[key] = entry
        del runtime
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("benchmark: %s done", key)

    failed = sorted(key for key, entry in results.items() if entry.get("failed"))
    summary = {
        "ok": not failed and not export_summary.get("failed"),
        "failed": failed,
        "export_failed": export_summary.get("failed", {}),
        "reference": "torch/fp32",
        "reference_miou": reference_miou,
        "device": str(device),
        "img_size": list(img_size),
        "config": config.model_dump(mode="json"),
        "environment": environment_info(),
        "runtimes": results,
        "skipped": skipped,
        "notes": BENCHMARK_NOTES,
    }
    points = _pareto_points(results, min(config.batch_sizes))
    if points:
        pareto_plot(points, out_dir / PARETO_FILE, title=f"Latency (batch {min(config.batch_sizes)}) vs mIoU")
        summary["pareto_plot"] = PARETO_FILE
    return summary
