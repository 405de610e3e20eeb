"""Tiny datasets written in each dataset's exact on-disk layout (8x6-ish images), for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

H, W = 6, 8


def image(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_rgb(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), "RGB").save(path)
    return path


def save_ids(path: Path, ids: np.ndarray, palette: list[tuple[int, int, int]] | None = None) -> Path:
    """A single-channel id map: mode L, or a palette PNG (mode P) whose indices are the ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = Image.fromarray(ids.astype(np.uint8), "L")
    if palette is not None:
        label = label.convert("P")
        label.putpalette([c for color in palette for c in color] + [0] * (768 - 3 * len(palette)))
    label.save(path)
    return path


def ids_grid(values: list[int], height: int = H, width: int = W) -> np.ndarray:
    """``values`` laid out row-major, repeated to fill the map (every value appears at least once when
    there are at most ``height * width`` of them)."""
    return np.resize(np.array(values, dtype=np.int64), (height, width))


def cityscapes(root: Path, split: str = "train", frames: int = 2) -> Path:
    """``leftImg8bit/{split}/{city}`` + ``gtFine`` (labelIds and labelTrainIds); labels hold ids 0..33."""
    for i in range(frames):
        city = "aachen" if i % 2 == 0 else "bochum"
        stem = f"{city}_{i:06d}_000019"
        save_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image(i))
        ids = ids_grid(list(np.roll(np.arange(34), i)), 6, 8)
        save_ids(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
        save_ids(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", ids_grid([0, 18, 255], 6, 8))
    return root


def bdd100k(root: Path, split: str = "val", frames: int = 2) -> Path:
    for i in range(frames):
        save_rgb(root / "images" / "10k" / split / f"{i:04d}abcd-0000{i}.jpg", image(i))
        masks = root / "labels" / "sem_seg" / "masks" / split
        save_ids(masks / f"{i:04d}abcd-0000{i}.png", ids_grid([*range(19), 255]))
    return root
