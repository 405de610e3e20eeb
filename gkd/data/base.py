"""Reading images and label maps with errors that name the file; the generic labeled and unlabeled
datasets every concrete dataset builds on; the selection (label fraction, limit, skipped samples)
that ``build_dataset`` returns.

A sample is a dict: ``image`` float ``(3, H, W)`` in ``[0, 1]`` (normalisation belongs to each model),
``label`` int64 ``(H, W)`` with train ids and ``IGNORE_INDEX`` (labeled sets only), ``path`` str.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from gkd.utils.io import write_json

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ID_MODES = ("L", "P", "I", "I;16")  # PIL modes of single-channel label maps (8-bit, palette, 32- and 16-bit)

Sample = dict
Transform = Callable[[Sample], Sample]
RGB = tuple[int, int, int]
LabelReader = Callable[[Path], np.ndarray]
T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("gkd.data")


class DataError(Exception):
    """Bad input data: the message names the file."""


def open_image(path: Path) -> Image.Image:
    """The decoded image file; a missing, corrupt or truncated file is a `DataError` naming it."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = Image.open(path)
        image.load()  # decode now so a truncated file fails here, naming itself
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: corrupt or unreadable image ({error})") from error
    return image


def read_image(path: str | Path) -> np.ndarray:
    """RGB ``uint8 (H, W, 3)``."""
    return np.array(open_image(Path(path)).convert("RGB"))


def read_label(path: str | Path) -> np.ndarray:
    """Raw label ids ``(H, W)`` exactly as stored (palette PNGs give their indices, not colours)."""
    image = open_image(Path(path))
    if image.mode not in ID_MODES:
        raise DataError(f"{path}: label map has mode {image.mode}, expected single-channel ids")
    return np.asarray(image).astype(np.int64)


def _color_codes(colors: np.ndarray) -> np.ndarray:
    colors = colors.astype(np.int64)
    return (colors[..., 0] << 16) | (colors[..., 1] << 8) | colors[..., 2]


class ColorLabelReader:
    """Reads a colour-coded label map (RGB) into ids with a ``{colour: id}`` table; a colour missing
    from the table is an error naming the file, never a silent id."""

    def __init__(self, colors: Mapping[RGB, int]) -> None:
        codes = _color_codes(np.array(list(colors), dtype=np.int64))
        order = np.argsort(codes)
        self.codes = codes[order]
        self.ids = np.array(list(colors.values()), dtype=np.int64)[order]

    def __call__(self, path: Path) -> np.ndarray:
        image = open_image(Path(path))
        if image.mode not in ("RGB", "RGBA", "P"):
            raise DataError(f"{path}: label map has mode {image.mode}, expected colour-coded RGB")
        return self.decode(image, path)

    def decode(self, image: Image.Image, path: Path) -> np.ndarray:
        """The ids of an opened colour-coded label map (``path`` names it in errors)."""
        codes = _color_codes(np.asarray(image.convert("RGB")))
        slot = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        known = self.codes[slot] == codes
        if not known.all():
            unknown = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in np.unique(codes[~known])[:5].tolist()]
            raise DataError(f"{path}: label colours {unknown} are not in the dataset's colour table")
        return self.ids[slot]


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
        outside = (raw < 0) | (raw >= len(self.lookup))
        if outside.any():
            raise DataError(f"{path}: label ids {sorted(np.unique(raw[outside]).tolist())} outside the dataset's table")
        mapped = self.lookup[raw]
        if (mapped < 0).any():
            unknown = sorted(np.unique(raw[mapped < 0]).tolist())
            raise DataError(f"{path}: label ids {unknown} are not in the dataset's table")
        return mapped


def to_sample(image: np.ndarray, label: np.ndarray | None, path: str) -> Sample:
    """Numpy image (and label) -> tensors of the sample format."""
    sample: Sample = {"image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0), "path": path}
    if label is not None:
        sample["label"] = torch.from_numpy(np.ascontiguousarray(label)).long()
    return sample


class SegmentationDataset(Dataset):
    """Pairs of (image file, label file), a label mapping, and a transform.

    Args:
        pairs: ``(image, label)`` files, one sample each.
        label_mapper: raw label ids -> train ids (``IGNORE_INDEX`` for ignored ones).
        num_classes: evaluated classes.
        class_names: their names.
        transform: applied to each sample (image and label together).
        label_reader: a label file -> raw ids (default: the stored ids; ``ColorLabelReader`` for colour-coded
            maps).
        image_reader: an image file -> RGB (default: as stored).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        label_mapper: LabelMapper,
        num_classes: int,
        class_names: Sequence[str],
        transform: Transform | None = None,
        label_reader: LabelReader = read_label,
        image_reader: Callable[[Path], np.ndarray] = read_image,
    ) -> None:
        if not pairs:
            raise DataError("dataset has no samples")
        self.pairs = list(pairs)
        self.label_mapper = label_mapper
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.transform = transform
        self.label_reader = label_reader
        self.image_reader = image_reader

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Sample:
        """The sample at native resolution, before the transform."""
        image_path, label_path = self.pairs[index]
        image = self.image_reader(image_path)
        label = self.label_mapper(self.label_reader(label_path), label_path)
        if label.shape != image.shape[:2]:
            raise DataError(f"{label_path}: label size {label.shape[::-1]} differs from image {image.shape[1::-1]}")
        return to_sample(image, label, str(image_path))

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        return self.transform(sample) if self.transform else sample


class ImageListDataset(Dataset):
    """Unlabeled images from a list of files (the images-only view of a labeled split, or a folder)."""

    def __init__(self, paths: Sequence[Path], transform: Transform | None = None) -> None:
        if not paths:
            raise DataError("dataset has no images")
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Sample:
        """The image at native resolution, before the transform."""
        return to_sample(read_image(self.paths[index]), None, str(self.paths[index]))

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        return self.transform(sample) if self.transform else sample


class CachedDataset(Dataset):
    """Keeps each decoded native-resolution sample in memory after its first read; the (random) transform
    still runs on every access. For small datasets read many times (a few hundred frames, many epochs),
    where PNG decoding would otherwise cost more than the model. With ``num_workers > 0`` every worker
    fills its own copy (the trainer's workers persist for the whole stage, so each frame is decoded at most
    once per worker)."""

    def __init__(self, dataset: SegmentationDataset | ImageListDataset) -> None:
        self.dataset = dataset
        self.samples: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Sample:
        if index not in self.samples:
            self.samples[index] = self.dataset.load(index)
        return dict(self.samples[index])

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        return self.dataset.transform(sample) if self.dataset.transform else sample


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (any depth: flat folders and ImageNet-style class folders), sorted."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def parallel_map(fn: Callable[[T], R], items: Sequence[T], chunk: int = 64) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed on a few threads (image decoding releases the
    GIL); chunk by chunk, so an exception surfaces after at most one chunk of extra work."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(items), chunk):
            yield from pool.map(fn, items[start : start + chunk])


def load_problems(dataset: Dataset, indices: Sequence[int]) -> Iterator[str | None]:
    """For each index, in order: why ``dataset.load(index)`` fails (its `DataError`), or ``None`` when it loads;
    loaded on a few threads (`parallel_map`)."""

    def problem(index: int) -> str | None:
        try:
            dataset.load(index)
        except DataError as error:
            return str(error)
        return None

    return parallel_map(problem, indices)


class Selection(Dataset):
    """The samples of a split that a run uses: the seeded label fraction, then the first ``limit``,
    minus bad samples when ``skip_bad`` (each listed in ``skipped``, the message naming the file).

    ``fraction_indices`` index the split's sorted sample list (``names``), before ``limit`` and skipping;
    ``indices`` are the ones actually served. ``save_fraction_indices`` writes them for the run dir.

    Args:
        dataset: the whole split.
        names: its samples' names, in order.
        fraction_indices: the seeded label fraction's indices.
        indices: the indices served (after ``limit`` and skipping).
        skipped: why each skipped sample was skipped.
        info: the split's description (``name``, ``split``, classes, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        names: Sequence[str],
        fraction_indices: Sequence[int],
        indices: Sequence[int],
        skipped: Sequence[str],
        info: dict,
    ) -> None:
        if not indices:
            raise DataError(f"{info.get('name')} {info.get('split')}: no samples left to use")
        self.dataset = dataset
        self.names = list(names)
        self.fraction_indices = list(fraction_indices)
        self.indices = list(indices)
        self.skipped = list(skipped)
        self.info = dict(info)
        self.num_classes: int = info["num_classes"]
        self.class_names: list[str] = list(info["class_names"])
        self.palette: list[RGB] = list(info["palette"])

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Sample:
        """The sample at native resolution, before the transform."""
        return self.dataset.load(self.indices[index])

    def __getitem__(self, index: int) -> Sample:
        return self.dataset[self.indices[index]]

    def save_fraction_indices(self, path: str | Path) -> None:
        """JSON: the settings, the split's size, the chosen indices and their sample names."""
        record = {
            **{key: self.info[key] for key in ("name", "root", "split", "fraction", "fraction_seed", "limit")},
            "num_total": len(self.names),
            "fraction_indices": self.fraction_indices,
            "fraction_names": [self.names[i] for i in self.fraction_indices],
            "used_indices": self.indices,
            "skipped": self.skipped,
        }
        write_json(path, record)


def default_palette(num_classes: int) -> list[RGB]:
    """Distinct colours for datasets that declare none (mmseg draws random ones; these are fixed)."""
    rng = np.random.default_rng(0)
    return [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(num_classes)]
