"""The export and benchmark stages: JSON-able summaries of what was written, how it compares, how fast it runs.

Artifacts are keyed ``kind/precision`` (``onnx/fp32``, ``onnx/fp16``, ``onnx/int8``, ``tensorrt/fp16``,
``tensorrt/int8``, ``aoti/fp32``); runtimes ``runtime/precision`` (``torch/fp32``, ``onnxruntime/int8``, ...).
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gkd.export.aoti import compile_aoti, load_aoti
from gkd.export.config import BenchmarkConfig, ExportConfig, ParityConfig
from gkd.export.latency import benchmark_runtime, environment_info
from gkd.export.onnx import (
    INPUT_NAME,
    OUTPUT_NAME,
    baked_size,
    check_parity,
    export_onnx,
    half_precision,
    onnxruntime_unavailable,
    prepare_for_export,
)
from gkd.export.parity import compare_logits, judge
from gkd.export.quantize import quantize_with_fallback, split_calibration
from gkd.export.runtimes import Runtime, TorchRuntime, load_runtime, runtime_loaders
from gkd.export.tensorrt import build_engine, tensorrt_unavailable
from gkd.models.segmentor import Segmentor
from gkd.utils.io import atomic_path

log = logging.getLogger("gkd")

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
ENGINE_FILES = {"fp16": "model.fp16.engine", "int8": "model.int8.engine"}
AOTI_FILES = {"fp32": "model.pt2", "bf16": "model.bf16.pt2", "fp16": "model.fp16.pt2"}
ONNXRUNTIME_RUNTIMES = ("onnxruntime", "onnxruntime-trt")
PARITY_FILE = "parity_images.npy"
TIMING_CACHE_FILE = "tensorrt.timing.cache"
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


def _attempt(summary: dict, key: str, make: Callable[[], dict]) -> None:
    """``make()`` recorded as ``summary["artifacts"][key]``; an exception is recorded under ``failed``
    with its message and logged, and the other artifacts still get made."""
    try:
        info = make()
    except Exception as error:  # one artifact that does not build never aborts the stage
        summary["failed"][key] = f"{type(error).__name__}: {error}"
        log.error("export: %s failed: %s", key, error)
        return
    summary["artifacts"][key] = info
    parity = info.get("parity", {})
    if parity and not parity["passed"]:
        summary["failed"][key] = f"parity: {parity['reason']}"
        log.error("export: %s misses parity with PyTorch fp32: %s", key, parity["reason"])


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

    ONNX files are exported from a CPU copy and checked in ONNX Runtime's CPU provider; engines and the
    AOTInductor packages are built on ``device``. Each artifact's parity is judged by its precision's
    tolerance (``config.parity``, `gkd.export.parity`). An artifact that misses parity stays in
    ``artifacts`` with its numbers and is listed under ``failed``, as is one that does not build; missing
    TensorRT or GPU puts artifacts under ``skipped`` with the reason. Without ONNX Runtime the fp32 / fp16
    ONNX files are still written, listed under ``not_checked`` (their parity) and int8 is skipped (its
    quantizer is ONNX Runtime's). Nothing aborts the stage.

    Args:
        segmentor: the trained model.
        img_size: ``(H, W)`` every artifact takes.
        out_dir: where the artifacts and the parity images go.
        config: the recipe's export block (precisions, opset, batch range, engines, parity tolerances).
        calibration_images: source images for int8: the first ``config.calibration_images`` calibrate, up to
            ``config.int8_fallback.holdout_images`` more are the sensitivity fallback's held-out set.
        parity_images: images every artifact is compared with PyTorch fp32 on (saved for the benchmark).
        device: where engines and AOTInductor packages are built.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img_size = (int(img_size[0]), int(img_size[1]))
    prepared = prepare_for_export(segmentor, img_size).to("cpu")
    summary: dict = {
        "img_size": list(img_size),
        "encoder_input_size": list(baked_size(prepared, img_size)),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, *img_size], "range": [0.0, 1.0]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", "classes", *img_size]},
        "opset": config.opset,
        "batch_range": list(config.batch_range),
        "parity_images": PARITY_FILE,
        "parity_tolerances": config.parity.model_dump(),
        "artifacts": {},
        "skipped": {},
        "failed": {},
        "not_checked": {},
        "environment": environment_info(),
    }
    _save_parity_images(out_dir / PARITY_FILE, parity_images)
    _export_onnx_files(prepared, out_dir, config, summary, calibration_images, parity_images)
    _build_engines(out_dir, config, device, summary, img_size)
    _compile_aoti_packages(prepared, out_dir, config, device, summary, img_size, parity_images)
    for key, reason in summary["skipped"].items():
        log.warning("export: skipped %s: %s", key, reason)
    return summary


def _export_onnx_files(
    prepared: torch.nn.Module,
    out_dir: Path,
    config: ExportConfig,
    summary: dict,
    calibration_images: torch.Tensor,
    parity_images: torch.Tensor,
) -> None:
    img_size, batch_range = summary["img_size"], config.batch_range
    onnxruntime_missing = onnxruntime_unavailable()

    def onnx_file(precision: str) -> dict:
        path = out_dir / ONNX_FILES[precision]
        if precision == "int8":
            fallback = config.int8_fallback
            calibration, holdout = split_calibration(
                calibration_images, config.calibration_images, fallback.holdout_images if fallback.enabled else 0
            )
            info = quantize_with_fallback(
                out_dir / ONNX_FILES["fp32"],
                path,
                calibration,
                holdout,
                config.parity.tolerance("int8"),
                fallback,
                config.calibration_method,
            )
        else:
            model = prepared if precision == "fp32" else half_precision(prepared)
            info = export_onnx(model, path, img_size, config.opset, batch_range)
        if precision == "fp16":
            info["numerics"] = FP16_NUMERICS
        if not onnxruntime_missing:
            info["parity"] = check_parity(prepared, path, parity_images, config.parity.tolerance(precision))
        return info

    for precision in config.precisions:
        key = f"onnx/{precision}"
        if precision == "int8" and onnxruntime_missing:
            summary["skipped"][key] = f"not quantized (ONNX Runtime's quantizer): {onnxruntime_missing}"
            continue
        if precision == "int8" and "onnx/fp32" not in summary["artifacts"]:
            summary["failed"][key] = "not quantized: model.onnx (fp32) was not written"
            continue
        _attempt(summary, key, lambda p=precision: onnx_file(p))
        if onnxruntime_missing and key in summary["artifacts"]:
            summary["not_checked"][key] = onnxruntime_missing
            log.warning("export: %s written, its parity not checked: %s", key, onnxruntime_missing)
    written = [p for p in config.precisions if f"onnx/{p}" in summary["artifacts"]]
    log.info("export: ONNX %s written to %s", ", ".join(written) or "nothing", out_dir)


def _build_engines(
    out_dir: Path, config: ExportConfig, device: torch.device, summary: dict, img_size: tuple[int, int]
) -> None:
    for precision in (p for p in ("fp16", "int8") if p in config.precisions):
        key = f"tensorrt/{precision}"
        reason = "disabled (export.tensorrt: false)" if not config.tensorrt else tensorrt_unavailable(device)
        if not reason and f"onnx/{precision}" not in summary["artifacts"]:
            reason = f"no {ONNX_FILES[precision]} to build from"
        if reason:
            summary["skipped"][key] = reason
            continue
        _attempt(
            summary,
            key,
            lambda p=precision: build_engine(
                out_dir / ONNX_FILES[p],
                out_dir / ENGINE_FILES[p],
                p,
                img_size,
                config.batch_range,
                config.workspace_mib,
                out_dir / TIMING_CACHE_FILE,
            ),
        )


def _compile_aoti_packages(
    prepared: torch.nn.Module,
    out_dir: Path,
    config: ExportConfig,
    device: torch.device,
    summary: dict,
    img_size: tuple[int, int],
    parity_images: torch.Tensor,
) -> None:
    reference: np.ndarray | None = None
    for precision in config.aoti_precisions:
        key = f"aoti/{precision}"
        if not config.aoti:
            summary["skipped"][key] = "disabled (export.aoti: false)"
            continue
        if precision != "fp32" and device.type != "cuda":
            summary["skipped"][key] = f"{precision} AOTInductor packages are compiled for CUDA only"
            continue
        if reference is None:  # PyTorch fp32 on the export device: the reference of every package
            with torch.no_grad():
                reference = copy.deepcopy(prepared).to(device)(parity_images.to(device)).cpu().numpy()

        def package(p: str = precision, expected: np.ndarray = reference) -> dict:
            path = out_dir / AOTI_FILES[p]
            info = compile_aoti(prepared, path, img_size, config.batch_range, device, p)
            with torch.no_grad():
                candidate = load_aoti(path)(parity_images.to(device)).float().cpu().numpy()
            info["parity"] = judge(compare_logits(expected, candidate), config.parity.tolerance(p))
            return info

        _attempt(summary, key, package)


def _not_checked(loaders: dict, device: torch.device) -> dict[str, str]:
    """``{runtime key: why}`` for the ONNX Runtime rows that cannot run because it is not installed."""
    onnxruntime_missing = onnxruntime_unavailable()
    # ONNX Runtime's TensorRT provider needs a GPU first: on a CPU its loader says so, installed or not.
    needs_onnxruntime = ONNXRUNTIME_RUNTIMES if device.type == "cuda" else ("onnxruntime",)
    return {
        key: onnxruntime_missing for key in loaders if onnxruntime_missing and key.split("/")[0] in needs_onnxruntime
    }


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
        del runtime
        _release_memory(device)
        log.info("benchmark: %s done", key)
    return _benchmark_summary(results, references, export_summary, config, device, img_size, skipped, not_checked)


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
