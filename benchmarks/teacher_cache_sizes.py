"""Bytes per cached view of every zoo teacher, and what a cache of a dataset costs on disk.

A stage-1 cache row holds what the loss consumes of one view: the teacher's final-normalised tokens of the
loss's teacher layers (QSD and MSE: the last block; patch tokens and the CLS token), in the cache dtype. The
count is exact (the grid the backbone uses at that input size, `gkd.models.backbone.Backbone.grid_size`), not
measured: the models are built on the meta device, so nothing is allocated.

    python benchmarks/teacher_cache_sizes.py --out benchmarks/teacher_cache_sizes.json
"""

from __future__ import annotations

import argparse
import json

import torch

from gkd.compress.losses import build_loss
from gkd.models.zoo import SPECS, TEACHER, create_backbone

SIZES = ((224, None), (512, None), (512, 16))  # (input, patch): native patch, and GKD's patch 16 at 512
DATASETS = {"ImageNet-1k train": 1_281_167, "GTAV": 24_966, "Cityscapes train": 2_975, "CamVid day train": 305}


def bytes_per_view(name: str, size: int, patch: int | None, loss: str, itemsize: int) -> tuple[int, tuple]:
    """Bytes of one view's cached tokens, and the token grid."""
    with torch.device("meta"):
        teacher = create_backbone(name, patch_size=patch)
        student = create_backbone("deit_small")
    layers = build_loss(loss, {}, student.embed_dim, teacher.embed_dim).teacher_layers
    grid = teacher.grid_size(size, size)
    tokens = grid[0] * grid[1] + (1 if teacher.has_cls_token else 0)
    return len(layers) * tokens * teacher.embed_dim * itemsize, grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", default="qsd")
    parser.add_argument("--views", type=int, default=4, help="K, views per image")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for name, spec in SPECS.items():
        if TEACHER not in spec.roles:
            continue
        for size, patch in SIZES:
            per_view, grid = bytes_per_view(name, size, patch, args.loss, itemsize=2)
            row = {"teacher": name, "input": size, "patch": patch or spec.patch_size, "grid": list(grid)}
            row["fp16_bytes_per_view"] = per_view
            row["fp16_gib_per_dataset"] = {k: n * args.views * per_view / 2**30 for k, n in DATASETS.items()}
            rows.append(row)
            print(
                f"{name:>20} {size:>4}/{row['patch']:<2} {per_view / 2**20:7.2f} MiB/view  "
                + "  ".join(f"{k}: {v:,.0f} GiB" for k, v in row["fp16_gib_per_dataset"].items()),
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"loss": args.loss, "views": args.views, "dtype": "fp16", "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
