"""Time and peak memory of the pre-flight weight check (`gkd.preflight`: a strict load into meta parameters) on a
ViT-L/14 checkpoint in the official DINOv2 layout (random weights, 1.2 GB), with the file memory-mapped (as
`gkd.models.weights` reads it) or read whole (as before). Each mode runs in a fresh process.

    python benchmarks/preflight_weights.py --checkpoint /tmp/dinov2_vitl14_like.pth
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

import gkd.models.weights as weights

ARCH = "vit_large_patch14_dinov2"


def write_checkpoint(path: Path) -> None:
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=518)
    torch.save({**model.state_dict(), "mask_token": torch.zeros(1, model.embed_dim)}, path)


def measure(path: Path, mode: str) -> str:
    if mode == "whole":  # the reading before memory mapping
        weights._torch_load_mapped = lambda file: torch.load(file, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=518)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, as in the pre-flight check
        weights.load_weights(model, path)
    seconds, peak = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"{mode}: {seconds:.2f} s, peak RSS +{(peak - before) / 2**20:.2f} GiB over the process before the load"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="written here first if absent")
    parser.add_argument("--mode", choices=["mapped", "whole"], help="one mode in this process (internal)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.mode:
        print(measure(args.checkpoint, args.mode))
        return
    if not args.checkpoint.is_file():
        write_checkpoint(args.checkpoint)
    print(f"{args.checkpoint}: {args.checkpoint.stat().st_size / 2**30:.2f} GiB")
    for _ in range(args.rounds):
        for mode in ("whole", "mapped"):
            command = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--mode", mode]
            print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
