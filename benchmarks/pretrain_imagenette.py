"""Pre-train a benchmark student on imagenette-5k's class labels: the stand-in for an ImageNet DeiT.

The paper's F2L students start from ImageNet-pretrained DeiT weights, and the authors' no-KD row is that
frozen DeiT with a segmentation head. No ImageNet weights reach this machine, so the CamVid benchmark's
students start from this: the recipe's student architecture with a 10-way classifier, trained with
cross-entropy on ``imagenette-5k/train`` (4,000 photographs at 224) and scored on ``val`` (1,000). The
classifier is dropped on save; `gkd.models.weights.load_weights` resamples the position embedding to the
recipe's input size. Usage (see benchmarks/camvid_day2dusk.md)::

    python benchmarks/pretrain_imagenette.py ../shared/data/imagenette-5k --out weights/student_imagenette.pth

Images are decoded once into memory (5,000 x 224 x 224 x 3 bytes = 750 MB) so the epochs cost only the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from gkd.utils.io import atomic_path, write_json


def load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 (N, 3, 224, 224), labels (N,), class folders)`` of one ImageFolder split."""
    classes = sorted(path.name for path in root.iterdir() if path.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            with Image.open(file) as image:
                array = np.asarray(image.convert("RGB").resize((224, 224), Image.BICUBIC))
            images.append(torch.from_numpy(array).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels), classes


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: v2.Normalize) -> float:
    """Top-1 accuracy on centre (whole) images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 100):
            batch = normalize(images[start : start + 100].float() / 255)
            correct += int((model(batch).argmax(1) == labels[start : start + 100]).sum())
    model.train()
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="imagenette-5k (train/ and val/ class folders)")
    parser.add_argument("--out", type=Path, required=True, help="weights file to write (.pth, timm layout)")
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--kwargs", default='{"embed_dim": 64, "depth": 4, "num_heads": 2}', help="timm kwargs, JSON")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_images, train_labels, classes = load_split(args.root / "train")
    val_images, val_labels, _ = load_split(args.root / "val")
    model = timm.create_model(args.arch, pretrained=False, num_classes=len(classes), **json.loads(args.kwargs))
    config = model.pretrained_cfg
    normalize = v2.Normalize(config["mean"], config["std"])  # what gkd's Backbone applies to [0, 1] images
    augment = v2.Compose([v2.RandomResizedCrop(224, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * (len(train_images) // args.batch_size)
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + np.cos(np.pi * (s - warmup) / (steps - warmup))),
    )
    start = time.perf_counter()
    with tqdm(total=steps, desc="pretrain") as bar:
        for _ in range(args.epochs):
            order = torch.randperm(len(train_images))
            for first in range(0, len(order) - args.batch_size + 1, args.batch_size):
                picks = order[first : first + args.batch_size]
                batch = torch.stack([augment(image) for image in train_images[picks]]).float() / 255
                loss = F.cross_entropy(model(normalize(batch)), train_labels[picks], label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    top1 = accuracy(model, val_images, val_labels, normalize)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("head.")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as partial:
        torch.save(state, partial)
    summary = {
        "arch": args.arch,
        "kwargs": json.loads(args.kwargs),
        "epochs": args.epochs,
        "steps": steps,
        "val_top1": top1,
        "minutes": (time.perf_counter() - start) / 60,
        "threads": torch.get_num_threads(),
    }
    write_json(args.out.with_suffix(".json"), summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
