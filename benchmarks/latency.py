"""Latency of a segmentor in every runtime x precision that runs on this machine.

Exports the segmentor (ONNX fp32 / fp16 / int8, TensorRT engines, AOTInductor package) into a work
directory, then times each runtime with the harness of ``gkd.export.latency``. Random weights are fine for
latency; int8 is calibrated on random images here, so its accuracy means nothing (the pipeline's benchmark
stage measures accuracy). The JSON written to ``--out`` records the command that made it.

    python benchmarks/latency.py --arch deit_small --img-size 512 --batch-sizes 1 8 --out vits_512.json
    python benchmarks/latency.py --arch deit_base --img-size 512 --out vitb_512.json
    python benchmarks/latency.py --arch deit_small --decoder mask2former --img-size 512 --out vits_m2f_512.json
    python benchmarks/latency.py --segmentor runs/x/segmentor.safetensors --img-size 512 --out x.json

On CUDA every PyTorch and AOTInductor row is also timed as a CUDA graph (``torch-cudagraph``, ``aoti-cudagraph``).
``--runtimes torch torch-cudagraph`` times the PyTorch model alone and exports nothing (seconds, not minutes, for
a Mask2Former head).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from gkd.export.benchmark import BenchmarkConfig, benchmark_artifacts
from gkd.export.config import ExportConfig
from gkd.export.stage import export_artifacts
from gkd.models.checkpoint import load_segmentor
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor
from gkd.models.zoo import create_backbone
from gkd.utils.io import write_json
from gkd.utils.runtime import resolve_device

PYTORCH_RUNTIMES = {"torch", "torch-cudagraph"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small", help="zoo spec or timm ViT name (random init)")
    parser.add_argument("--timm-kwargs", default="{}", help='JSON timm kwargs, e.g. \'{"embed_dim": 64, "depth": 4}\'')
    parser.add_argument("--decoder", choices=["uper", "linear", "mask2former"], default="uper")
    parser.add_argument("--channels", type=int, default=256, help="decoder width (uper, mask2former)")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--segmentor", type=Path, help="a trained segmentor.safetensors (overrides the arch options)")
    parser.add_argument("--img-size", type=int, nargs="+", default=[512, 512], help="H [W]")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10, help="warm-up iterations")
    parser.add_argument("--warmup-seconds", type=float, default=0.2)
    parser.add_argument("--runtimes", nargs="+", default=["auto"], help="auto, or runtime names")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8"], choices=["fp32", "fp16", "int8"])
    parser.add_argument("--no-tensorrt", action="store_true")
    parser.add_argument("--no-aoti", action="store_true")
    parser.add_argument(
        "--aoti-precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16", "fp16"],
        help="AOTInductor packages (bf16 / fp16 are compiled on CUDA only)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--work-dir", type=Path, help="where artifacts are written (default: a temporary directory)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> tuple[Segmentor, dict]:
    """The segmentor to time and a description of it."""
    if args.segmentor is not None:
        segmentor, metadata = load_segmentor(args.segmentor)
        return segmentor.eval(), {"segmentor": str(args.segmentor), **metadata}
    encoder = create_backbone(args.arch, **json.loads(args.timm_kwargs))
    decoder, layers = build_decoder(
        DecoderConfig(name=args.decoder, channels=args.channels), encoder.embed_dim, encoder.depth, args.num_classes
    )
    description = {"arch": args.arch, "timm_kwargs": json.loads(args.timm_kwargs), "decoder": args.decoder}
    return Segmentor(encoder, decoder, layers).eval(), description


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    img_size = (args.img_size[0], args.img_size[-1])
    device = resolve_device(args.device)
    segmentor, description = build_model(args)
    segmentor.to(device)
    description["params_m"] = sum(p.numel() for p in segmentor.parameters()) / 1e6
    export_config = ExportConfig(
        precisions=tuple(args.precisions),
        tensorrt=not args.no_tensorrt,
        aoti=not args.no_aoti,
        aoti_precisions=tuple(args.aoti_precisions),
        batch_range=(1, max(args.batch_sizes), max(32, *args.batch_sizes)),
    )
    benchmark_config = BenchmarkConfig(
        batch_sizes=tuple(args.batch_sizes),
        iterations=args.iterations,
        warmup_iterations=args.warmup,
        warmup_seconds=args.warmup_seconds,
        runtimes="auto" if args.runtimes == ["auto"] else args.runtimes,
        accuracy=False,
    )
    generator = torch.Generator().manual_seed(0)
    calibration = torch.rand(export_config.calibration_images, 3, *img_size, generator=generator)
    parity = torch.rand(2, 3, *img_size, generator=generator)
    with tempfile.TemporaryDirectory(prefix="gkd-latency-") as temp:
        work_dir = args.work_dir or Path(temp)
        if set(args.runtimes) <= PYTORCH_RUNTIMES:  # nothing to export: the runtimes run the model itself
            export = {"batch_range": list(export_config.batch_range), "artifacts": {}, "skipped": {}, "failed": {}}
        else:
            export = export_artifacts(segmentor, img_size, work_dir, export_config, calibration, parity, device)
        benchmark = benchmark_artifacts(segmentor, img_size, work_dir, export, benchmark_config, device, None)
    results = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv] if argv is None else ["latency.py", *argv]),
        "model": description,
        "img_size": list(img_size),
        "export": export,
        "benchmark": benchmark,
    }
    write_json(args.out, results)
    for key, entry in benchmark["runtimes"].items():
        for batch_size, latency in entry["latency"].items():
            timing = latency.get("error") or f"{latency['p50_ms']:.2f} ms p50, {latency['images_per_s']:.1f} img/s"
            print(f"{key:24s} batch {batch_size:>3s}: {timing}")
    for key, reason in benchmark["skipped"].items():
        print(f"{key:24s} skipped: {reason}")
    return results


if __name__ == "__main__":
    main()
