"""int8 variants of a trained CamVid student against fp32 in ONNX Runtime (CPU): mIoU per domain and latency.

Reads a run directory (``segmentor.safetensors`` + ``recipe.resolved.yaml``, e.g. a GKD run of
recipes/camvid_day2dusk.yaml); writes nothing into it. Exports the fp32 ONNX graph to a scratch directory,
quantizes it with each calibration method (seeded source images, `gkd.export.quantize`), with and without
the sensitivity fallback, and scores each graph on every target domain and its ORT CPU latency at batch 1.

    nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/int8_camvid.py RUN_DIR \
        --out benchmarks/int8_camvid --domain-limit 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from gkd.export.config import ExportConfig, Int8FallbackConfig
from gkd.export.latency import benchmark_runtime
from gkd.export.onnx import export_onnx, prepare_for_export
from gkd.export.quantize import quantize_int8, quantize_with_fallback, split_calibration
from gkd.export.runtimes import OnnxRuntime
from gkd.models.checkpoint import load_segmentor
from gkd.recipe import load_recipe
from gkd.stages.context import Run, make_domain_evaluator
from gkd.stages.export import _images
from gkd.utils.io import write_json, write_text
from gkd.utils.runtime import DistInfo

METHODS = ("minmax", "entropy", "percentile")


def _domain_mious(evaluate, runtime: OnnxRuntime) -> dict[str, float]:
    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runtime.predict(images.numpy()))

    return {name: metrics["miou"] for name, metrics in evaluate(predict).items() if name != "source"}


def _latency(path: Path, precision: str, img_size: tuple[int, int], threads: int, iterations: int) -> float:
    torch.set_num_threads(threads)  # onnx_session follows torch's intra-op thread count
    runtime = OnnxRuntime(path, precision, torch.device("cpu"), ["CPUExecutionProvider"])
    return benchmark_runtime(runtime, img_size, 1, iterations, 3)["p50_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/int8_camvid"), help="writes OUT.json, OUT.md")
    parser.add_argument("--calibration-images", type=int, default=ExportConfig().calibration_images)
    parser.add_argument("--holdout-images", type=int, default=Int8FallbackConfig().holdout_images)
    parser.add_argument("--max-float-nodes", type=int, default=Int8FallbackConfig().max_float_nodes)
    parser.add_argument("--domain-limit", type=int, default=None, help="first N frames of each target domain")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per latency figure")
    args = parser.parse_args(argv)

    recipe = load_recipe(args.run_dir / "recipe.resolved.yaml")
    if args.domain_limit is not None:
        targets = {name: t.model_copy(update={"limit": args.domain_limit}) for name, t in recipe.data.targets.items()}
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"targets": targets})})
    run = Run(recipe, args.run_dir, torch.device("cpu"), DistInfo())
    img_size = tuple(recipe.data.img_size)
    segmentor = load_segmentor(args.run_dir / "segmentor.safetensors")[0].eval()
    evaluate = make_domain_evaluator(run)
    images = _images(run, recipe.data.source, args.calibration_images + args.holdout_images, recipe.seed)
    calibration, holdout = split_calibration(images, args.calibration_images, args.holdout_images)
    tolerance = ExportConfig().parity.tolerance("int8")
    fallback = Int8FallbackConfig(holdout_images=args.holdout_images, max_float_nodes=args.max_float_nodes)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="int8_camvid.") as scratch:
        fp32 = Path(scratch) / "model.onnx"
        export_onnx(prepare_for_export(segmentor, img_size), fp32, img_size, 18, (1, 1, 8))
        graphs = {"fp32": (fp32, {})}
        for method in args.methods:
            path = Path(scratch) / f"{method}.onnx"
            graphs[f"int8 {method}"] = (path, quantize_int8(fp32, path, calibration, method))
            path = Path(scratch) / f"{method}.fallback.onnx"
            info = quantize_with_fallback(fp32, path, calibration, holdout, tolerance, fallback, method)
            graphs[f"int8 {method} + fallback"] = (path, info)
        for name, (path, info) in graphs.items():
            precision = "fp32" if name == "fp32" else "int8"
            torch.set_num_threads(1)
            start = time.perf_counter()
            miou = _domain_mious(evaluate, OnnxRuntime(path, precision, torch.device("cpu"), ["CPUExecutionProvider"]))
            results[name] = {
                "miou": miou,
                "eval_s": round(time.perf_counter() - start, 1),
                "latency_p50_ms": {str(t): _latency(path, precision, img_size, t, args.iterations) for t in (1, 2)},
                "excluded_nodes": info.get("excluded_nodes", []),
                "fallback": {k: v for k, v in info.get("fallback", {}).items() if k != "sensitivity"},
            }
            print(name, results[name]["miou"], results[name]["latency_p50_ms"], flush=True)

    reference = results["fp32"]
    for entry in results.values():
        entry["miou_drop"] = {d: reference["miou"][d] - entry["miou"][d] for d in reference["miou"]}
        entry["speedup"] = {t: reference["latency_p50_ms"][t] / entry["latency_p50_ms"][t] for t in ("1", "2")}
    command = "nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/int8_camvid.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_json(args.out.with_suffix(".json"), {"command": command, "img_size": list(img_size), "results": results})
    domains = list(reference["miou"])
    lines = [
        "# int8 vs fp32 on the CamVid student (ONNX Runtime, CPU)",
        "",
        f"Command: `{command}`",
        "",
        "| graph | "
        + " | ".join(f"{d} mIoU (drop)" for d in domains)
        + " | p50 ms 1 thr | p50 ms 2 thr | float nodes |",
        "|---|" + "---|" * (len(domains) + 3),
    ]
    for name, entry in results.items():
        cells = [f"{entry['miou'][d]:.2f} ({-entry['miou_drop'][d]:+.2f})" for d in domains]
        latency = [f"{entry['latency_p50_ms'][t]:.1f} ({entry['speedup'][t]:.2f}x)" for t in ("1", "2")]
        floats = len(entry["fallback"].get("float_nodes", []))
        lines.append(f"| {name} | " + " | ".join(cells + latency) + f" | {floats} |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
