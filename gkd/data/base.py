"""Reading images and label maps with errors that name the file; the generic labeled and unlabeled
datasets every concrete dataset builds on.

A sample is a dict: ``image`` float ``(3, H, W)`` in ``[0, 1]`` (normalisation belongs to each model),
``label`` int64 ``(H, W)`` with train ids and ``IGNORE_INDEX`` (labeled sets only), ``path`` str.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

Sample = dict
Transform = Callable[[Sample], Sample]


class DataError(Exception):
    """Bad input data: the message names the file."""


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = Image.open(path)
        image.load()  # decode now so a truncated file fails here, naming itself
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"{path}: corrupt or unreadable image ({error})") from error
    return image


def read_image(path: str | Path) -> np.ndarray:
    """RGB ``uint8 (H, W, 3)``."""
    return np.asarray(_open(Path(path)).convert("RGB"))


def read_label(path: str | Path) -> np.ndarray:
    """Raw label ids ``(H, W)`` exactly as stored (palette PNGs give their indices, not colours)."""
    image = _open(Path(path))
    if image.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"{path}: label map has mode {image.mode}, expected single-channel ids")
    return np.asarray(image).astype(np.int64)


def identity_label_map(num_classes: int, ignore_ids: Sequence[int] = (IGNORE_INDEX,)) -> dict[int, int]:
    """Raw id -> train id where they are the same, plus ignored ids."""
    table = {i: i for i in range(num_classes)}
    table.update({i: IGNORE_INDEX for i in ignore_ids})
    return table


class LabelMapper:
    """Maps raw label ids to train ids with a table; an id missing from the table is an error."""

    def __init__(self, table: dict[int, int]) -> None:
        self.table = dict(table)
        size = max(self.table) + 1
        self.lookup = np.full(max(size, 256), -1, dtype=np.int64)
        for raw, train_id in self.table.items():
            self.lookup[raw] = train_id

    def __call__(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        if raw.min() < 0 or raw.max() >= len(self.lookup):
            raise DataError(f"{path}: label id {int(raw.max())} outside the dataset's table")
        mapped = self.lookup[raw]
        if (mapped < 0).any():
            unknown = sorted(set(np.unique(raw[mapped < 0]).tolist()))
            raise DataError(f"{path}: label ids {unknown} are not in the dataset's table")
        return mapped


def to_sample(image: np.ndarray, label: np.ndarray | None, path: str) -> Sample:
    """Numpy image (and label) -> tensors of the sample format."""
    sample: Sample = {"image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0), "path": path}
    if label is not None:
        sample["label"] = torch.from_numpy(np.ascontiguousarray(label)).long()
    return sample


class SegmentationDataset(Dataset):
    """Pairs of (image file, label file), a label mapping, and a transform."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        label_mapper: LabelMapper,
        num_classes: int,
        class_names: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        if not pairs:
            raise DataError("dataset has no samples")
        self.pairs = list(pairs)
        self.label_mapper = label_mapper
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Sample:
        """The sample at native resolution, before the transform."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = self.label_mapper(read_label(label_path), label_path)
        if label.shape != image.shape[:2]:
            raise DataError(f"{label_path}: label size {label.shape[::-1]} differs from image {image.shape[1::-1]}")
        return to_sample(image, label, str(image_path))

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        return self.transform(sample) if self.transform else sample


class ImageFolderDataset(Dataset):
    """Unlabeled images under a folder (flat, or ImageNet-style class sub-folders), sorted by path."""

    def __init__(self, root: str | Path, transform: Transform | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found")
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        sample = to_sample(read_image(self.paths[index]), None, str(self.paths[index]))
        return self.transform(sample) if self.transform else sample
