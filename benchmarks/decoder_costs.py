"""What each decoder costs on a student: parameters, GFLOPs and PyTorch-eager latency, side by side.

For each student (zoo name, random weights) and decoder (UPerNet at width 256, Mask2Former at the paper's
settings: width 256, 100 queries, 6 + 9 layers), at one input size: encoder / decoder parameters, GFLOPs of
one image (``torch.utils.flop_counter``: matmuls and convolutions, 2 FLOPs per multiply-add; it counts no
``grid_sample``, softmax or normalisation, so deformable-attention sampling is not in the figure) and the
latency of PyTorch eager fp32 at batch 1 on ``--device`` (``gkd.export.latency``'s harness). The JSON written
to ``--out`` records the command that made it. Latency in the other runtimes: ``benchmarks/latency.py
--decoder mask2former``.

    python benchmarks/decoder_costs.py --students deit_small deit_base --img-size 512 --out costs_512.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from gkd.export.latency import benchmark_runtime, environment_info
from gkd.export.runtimes import TorchRuntime
from gkd.models.decoders import DecoderConfig, build_decoder
from gkd.models.segmentor import Segmentor
from gkd.models.zoo import create_backbone
from gkd.utils.io import write_json
from gkd.utils.runtime import resolve_device

DECODERS = {"uper": DecoderConfig(name="uper", channels=256), "mask2former": DecoderConfig(name="mask2former")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="+", default=["deit_small", "deit_base"], help="zoo specs")
    parser.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    return parser.parse_args(argv)


def gflops(segmentor: Segmentor, img_size: int, device: torch.device) -> float:
    """Forward GFLOPs of one image as torch's flop counter sees them."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        segmentor(torch.rand(1, 3, img_size, img_size, device=device))
    return counter.get_total_flops() / 1e9


def measure(student: str, decoder: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Parameters, GFLOPs and batch-1 eager latency of ``student`` with ``decoder``."""
    torch.manual_seed(0)
    encoder = create_backbone(student)
    head, layers = build_decoder(DECODERS[decoder], encoder.embed_dim, encoder.depth, args.num_classes)
    segmentor = Segmentor(encoder, head, layers).eval().to(device)
    runtime = TorchRuntime(segmentor, (args.img_size, args.img_size), "fp32", device)
    latency = benchmark_runtime(runtime, (args.img_size, args.img_size), 1, args.iterations, args.warmup)
    return {
        "student": student,
        "decoder": decoder,
        "layers": list(layers),
        "encoder_params_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2),
        "decoder_params_m": round(sum(p.numel() for p in head.parameters()) / 1e6, 2),
        "gflops": round(gflops(segmentor, args.img_size, device), 1),
        "latency_b1": latency,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    rows = []
    for student in args.students:
        for decoder in args.decoders:
            row = measure(student, decoder, args, device)
            rows.append(row)
            print(
                f"{student:12s} {decoder:12s} encoder {row['encoder_params_m']:6.2f} M  decoder "
                f"{row['decoder_params_m']:6.2f} M  {row['gflops']:7.1f} GFLOPs  "
                f"p50 {row['latency_b1']['p50_ms']:8.1f} ms",
                flush=True,
            )
    results = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv] if argv is None else ["decoder_costs.py", *argv]),
        "img_size": args.img_size,
        "num_classes": args.num_classes,
        "device": str(device),
        "environment": environment_info(),
        "rows": rows,
    }
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
