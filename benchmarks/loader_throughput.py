"""Images per second of the training data loader alone, per worker count.

The loader is the trainer's own (`gkd.compress.sampling.build_loader`: seeded samples, persistent workers,
prefetch, pinned memory on CUDA) over a real dataset and the recipe-style training transform (random resize,
crop, flip, colour jitter). ``--dataset camvid`` decodes CamVid PNGs (480x360) from ``--root``;
``--dataset synthetic`` renders the embedded default's street scenes. With ``--cache`` decoded frames stay in
memory (each worker keeps its own copy), so after the first epoch only augmentation is paid.

    python benchmarks/loader_throughput.py --dataset camvid --root ../shared/data/CamVid --crop 512 \\
        --batch-size 8 --workers 0 1 2 --batches 30 --out loader_camvid.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from gkd.compress.sampling import ResumableSampler, build_loader
from gkd.data.config import DatasetConfig, build_dataset
from gkd.data.transforms import TrainTransformConfig, build_train_transform
from gkd.utils.runtime import DistInfo, available_cpus


def benchmark_dataset(kind: str, crop: int | tuple[int, int], root: Path | None = None, cache: bool = False):
    """A labeled training dataset with the recipe-style transform at ``crop`` (``N`` or ``(H, W)``)."""
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    transform = build_train_transform(TrainTransformConfig(crop_size=crop, scale_range=(0.5, 2.0)))
    if kind == "synthetic":
        options = {"domain": "day", "num_samples": 256, "size": list(crop)}
        config = DatasetConfig(name="synthetic", split="train", options=options, cache=cache)
    elif kind == "camvid":
        if root is None or not Path(root).is_dir():
            raise SystemExit(f"--dataset camvid needs --root, the CamVid folder (got {root})")
        config = DatasetConfig(name="camvid", root=root, split="train", options={"domain": "day"}, cache=cache)
    else:
        raise SystemExit(f"unknown dataset {kind!r} (synthetic, camvid)")
    return build_dataset(config, transform=transform)


def loader_rate(dataset, batch_size: int, workers: int, batches: int, warmup: int, device: torch.device) -> dict:
    """Images/s of ``batches`` batches after ``warmup`` batches (worker start-up and first decodes)."""
    sampler = ResumableSampler(len(dataset), seed=0, info=DistInfo())
    loader = build_loader(dataset, batch_size, sampler, workers, device, seed=0)
    iterator = iter(loader)

    def next_batch():
        nonlocal iterator
        try:
            batch = next(iterator)
        except StopIteration:  # a small dataset: start the next epoch
            sampler.epoch += 1
            iterator = iter(loader)
            batch = next(iterator)
        return batch["image"].to(device, non_blocking=True)

    for _ in range(warmup):
        next_batch()
    start = time.perf_counter()
    for _ in range(batches):
        images = next_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    rate = batches * batch_size / seconds
    del iterator
    return {
        "workers": workers,
        "images_per_s": rate,
        "images_per_s_per_worker": rate / workers if workers else None,
        "batch_shape": list(images.shape),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("synthetic", "camvid"), default="synthetic")
    parser.add_argument("--root", type=Path, help="dataset folder (camvid)")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per worker count")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--cache", action="store_true", help="keep decoded frames in memory")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where batches are copied")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--out", type=Path, help="results JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = benchmark_dataset(args.dataset, args.crop, args.root, args.cache)
    results = {
        "benchmark": "loader_throughput",
        "command": shlex.join(["python", "benchmarks/loader_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "dataset": args.dataset,
        "samples": len(dataset),
        "crop": args.crop,
        "batch_size": args.batch_size,
        "cache": args.cache,
        "cpus_available": available_cpus(),
        "cpu_count": os.cpu_count(),
        "rates": [],
    }
    for workers in args.workers:
        rate = loader_rate(dataset, args.batch_size, workers, args.batches, args.warmup, device)
        results["rates"].append(rate)
        per_worker = rate["images_per_s_per_worker"]
        print(
            f"workers {workers:2d}: {rate['images_per_s']:8.1f} images/s"
            + (f" ({per_worker:.1f} per worker)" if per_worker else " (in the main process)"),
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
