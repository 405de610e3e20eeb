"""fp32 / PTQ int8 / QAD int8 mIoU per target domain for trained students (one run directory per seed).

Reads each run directory (``segmentor.safetensors``, ``recipe.resolved.yaml`` and, where the teacher was trained,
``teacher_segmentor.safetensors``); writes nothing into it: the fine-tune's checkpoints go to a scratch copy
(links to the run's files). Per run: the fp32 graph, ONNX Runtime's PTQ int8 graph (`quantize_with_fallback`,
as the export stage makes it) and the QAD int8 graph (`gkd.export.int8_qad.quantize_qad` with the recipe's
``export.int8`` settings, overridable here), each scored on every frame of every target domain (``--domain-limit``
for a quick look). ``--qdq-as-written`` runs the int8 graphs with ONNX Runtime's graph optimizations off (Q/DQ
computed as written, what TensorRT implements) instead of the CPU's fused int8 kernels.

    nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/int8_qad_camvid.py RUN_SEED0 RUN_SEED1 \
        RUN_SEED2 --out benchmarks/int8_qad_camvid
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from gkd.export.int8_qad import quantize_qad
from gkd.export.onnx import INPUT_NAME, export_onnx, onnx_session, prepare_for_export
from gkd.export.quantize import quantize_with_fallback, split_calibration
from gkd.models.checkpoint import load_segmentor
from gkd.recipe import Recipe, load_recipe
from gkd.stages.context import Run, make_domain_evaluator
from gkd.stages.export import _images, qad_training
from gkd.utils.io import write_json, write_text
from gkd.utils.runtime import DistInfo

GRAPHS = ("fp32", "int8 ptq", "int8 qad")


def _recipe(run_dir: Path, args: argparse.Namespace) -> Recipe:
    """The run's resolved recipe, its targets limited and its ``export.int8`` overridden as asked."""
    recipe = load_recipe(run_dir / "recipe.resolved.yaml")
    data = recipe.data
    if args.domain_limit is not None:
        targets = {name: t.model_copy(update={"limit": args.domain_limit}) for name, t in data.targets.items()}
        data = data.model_copy(update={"targets": targets})
    overrides = {k: getattr(args, k) for k in ("steps", "lr", "batch_size") if getattr(args, k) is not None}
    int8 = recipe.export.int8.model_copy(update={"method": "qad", **overrides})
    export = recipe.export.model_copy(update={"int8": int8})
    return recipe.model_copy(update={"data": data, "export": export})


def _predictor(path: Path, optimize: bool, batch_size: int = 8):
    session = onnx_session(path, optimize=optimize)

    def predict(images: torch.Tensor) -> torch.Tensor:
        array = images.float().numpy()
        outputs = [
            session.run(None, {INPUT_NAME: array[i : i + batch_size]})[0] for i in range(0, len(array), batch_size)
        ]
        return torch.from_numpy(np.concatenate(outputs))

    return predict


def benchmark_run(run_dir: Path, scratch: Path, args: argparse.Namespace) -> dict:
    """fp32 / PTQ / QAD mIoU per target domain of one run, and the QAD record."""
    for item in run_dir.iterdir():  # the run's files, read through links; the fine-tune writes only here
        if item.is_file():
            (scratch / item.name).symlink_to(item.resolve())
    recipe = _recipe(run_dir, args)
    run = Run(recipe, scratch, torch.device(args.device), DistInfo())
    config, img_size = recipe.export, tuple(recipe.data.img_size)
    prepared = prepare_for_export(load_segmentor(run_dir / "segmentor.safetensors")[0].eval(), img_size).cpu()
    fp32 = scratch / "model.onnx"
    export_onnx(prepared, fp32, img_size, config.opset, config.batch_range)
    holdout_count = config.int8_fallback.holdout_images if config.int8_fallback.enabled else 0
    images = _images(run, recipe.data.source, config.calibration_images + holdout_count, recipe.seed)
    calibration, holdout = split_calibration(images, config.calibration_images, holdout_count)
    parity = _images(run, recipe.data.source_val, 4, recipe.seed + 1)
    ptq = quantize_with_fallback(
        fp32, scratch / "ptq.onnx", calibration, holdout, config.parity.tolerance("int8"), config.int8_fallback
    )
    qad = quantize_qad(
        prepared, fp32, scratch / "qad.onnx", (calibration, holdout, parity), config, img_size, qad_training(run)
    )
    evaluate = make_domain_evaluator(run)
    paths = {"fp32": fp32, "int8 ptq": scratch / "ptq.onnx", "int8 qad": scratch / "qad.onnx"}
    miou = {}
    for name, path in paths.items():
        scores = evaluate(_predictor(path, optimize=name == "fp32" or not args.qdq_as_written), name)
        miou[name] = {domain: metrics["miou"] for domain, metrics in scores.items() if domain != "source"}
        print(run_dir, name, miou[name], flush=True)
    return {"miou": miou, "ptq_fallback": ptq.get("fallback", {}).get("float_nodes", []), "qad": qad["qad"]}


def _table(runs: dict[str, dict], command: str) -> str:
    """Markdown: mIoU (change vs fp32) per domain, per run and as the mean over runs."""
    domains = list(next(iter(runs.values()))["miou"]["fp32"])
    lines = [
        "# fp32 vs PTQ vs QAD int8 (ONNX Runtime, CPU)",
        "",
        f"Command: `{command}`",
        "",
        "| run | graph | " + " | ".join(f"{d} mIoU (vs fp32)" for d in domains) + " |",
        "|---|---|" + "---|" * len(domains),
    ]
    mean = {g: {d: statistics.mean(r["miou"][g][d] for r in runs.values()) for d in domains} for g in GRAPHS}
    rows = {**runs, f"mean of {len(runs)}": {"miou": mean}}
    for name, entry in rows.items():
        for graph in GRAPHS:
            cells = [
                f"{entry['miou'][graph][d]:.2f} ({entry['miou'][graph][d] - entry['miou']['fp32'][d]:+.2f})"
                for d in domains
            ]
            lines.append(f"| {name} | {graph} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="one trained run directory per seed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/int8_qad_camvid"), help="writes OUT.json, OUT.md")
    parser.add_argument("--domain-limit", type=int, default=None, help="first N frames of each target domain")
    parser.add_argument("--steps", type=int, default=None, help="QAD steps (default: the recipe's export.int8)")
    parser.add_argument("--lr", type=float, default=None, help="QAD learning rate (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="QAD batch size (default: the recipe's)")
    parser.add_argument("--device", default="cpu", help="where the fine-tune runs")
    parser.add_argument("--qdq-as-written", action="store_true", help="int8 graphs without graph optimizations")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = {}
    for run_dir in args.run_dirs:
        with tempfile.TemporaryDirectory(prefix="int8_qad.") as scratch:
            runs[str(run_dir)] = benchmark_run(run_dir, Path(scratch), args)
    command = "nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/int8_qad_camvid.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_json(args.out.with_suffix(".json"), {"command": command, "runs": runs})
    write_text(args.out.with_suffix(".md"), _table(runs, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
