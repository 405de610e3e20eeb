"""A dataset described once, as data: its classes and palette, its label mapping, and where a split's
images and labels lie on disk (mmseg's dataset classes, reduced to what a loader needs).

A ``Layout`` subclass declares ``name``, ``classes``, ``palette``, its ``Options`` (a pydantic model,
``extra="forbid"``) and implements ``image_dirs`` / ``label_dirs`` (folders a split needs, checked
before anything is listed), ``samples`` (the split's sorted ``(image, label)`` paths, possibly read from a
split file, not yet checked to exist) and ``label_mapper``. ``config.build_dataset`` does the rest
generically (pairing checks, fractions, skipping bad samples).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from gkd.data import base
from gkd.data.base import IGNORE_INDEX, RGB, DataError, LabelMapper, identity_label_map, list_images, read_label


class NoOptions(BaseModel):
    """A dataset without options: any key is an error."""

    model_config = ConfigDict(extra="forbid")


class Layout:
    """One split of one dataset on disk."""

    name: ClassVar[str]
    classes: ClassVar[tuple[str, ...]] = ()
    palette: ClassVar[tuple[RGB, ...]] = ()
    Options: ClassVar[type[BaseModel]] = NoOptions
    has_labels: ClassVar[bool] = True

    def __init__(self, root: Path, split: str, options: BaseModel) -> None:
        self.root = Path(root)
        self.split = split
        self.options = options

    def image_dirs(self) -> list[Path]:
        """Folders (or files) that must exist to list the split's images."""
        raise NotImplementedError

    def label_dirs(self) -> list[Path]:
        """Folders that must exist to read the split's labels."""
        return []

    def samples(self) -> list[tuple[Path, Path | None]]:
        """``(image, label)`` paths of the split, sorted (label ``None`` in unlabeled layouts); existence
        is checked by the caller."""
        raise NotImplementedError

    def label_mapper(self) -> LabelMapper:
        """Raw ids (as ``read_label`` returns them) -> train ids."""
        raise NotImplementedError

    @classmethod
    def class_info(cls, root: Path | None, options: BaseModel) -> tuple[tuple[str, ...], tuple[RGB, ...]]:
        """Class names and palette: fixed per dataset (``folder`` reads them from its options or root)."""
        return cls.classes, cls.palette

    def unpaired(self) -> list[str]:
        """Why each label file without an image is bad (checked when labels are read); none by default."""
        return []

    def read_label(self, path: Path) -> np.ndarray:
        """Raw ids of a label file (stored ids by default; colour-coded datasets override)."""
        return read_label(path)

    def read_image(self, path: Path) -> np.ndarray:
        """RGB ``uint8 (H, W, 3)`` of an image file (as stored by default)."""
        return base.read_image(path)

    def extra_paths(self) -> dict[str, Path]:
        """Optional files the layout uses when present (split files), for ``describe``."""
        return {}

    def check(self, labeled: bool) -> None:
        """A ``DataError`` naming the first missing root or split folder."""
        if not self.root.is_dir():
            raise DataError(f"{self.root}: {self.name} root not found")
        for path in self.image_dirs() + (self.label_dirs() if labeled else []):
            if not path.exists():
                raise DataError(f"{path}: not found ({self.name} split '{self.split}')")

    def describe(self) -> dict:
        """Resolved folders and the ones missing, without listing or reading any image."""
        images, labels = self.image_dirs(), self.label_dirs()
        expected = [*images, *labels] if self.root.is_dir() else [self.root]
        described = {
            "paths": {"images": [str(p) for p in images], "labels": [str(p) for p in labels]},
            "missing": [str(p) for p in expected if not p.exists()],
        }
        optional = {key: f"{p}{'' if p.exists() else ' (absent)'}" for key, p in self.extra_paths().items()}
        return {**described, "optional": optional} if optional else described


def glob_sorted(folder: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` under ``folder``, sorted by path (the order fractions index)."""
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def train_id_mapper(num_classes: int) -> LabelMapper:
    """Labels already stored as train ids ``0..num_classes-1`` plus ``IGNORE_INDEX``."""
    return LabelMapper(identity_label_map(num_classes, (IGNORE_INDEX,)))


def split_alias(split: str, aliases: dict[str, str], root: Path) -> str:
    """``split`` or its long name (``train`` -> ``training``) when only that folder exists."""
    if not (root / split).exists() and split in aliases and (root / aliases[split]).exists():
        return aliases[split]
    return split


class ImageFolder(Layout):
    """Unlabeled proxy images: ``root/{split}`` when that folder exists, else ``root`` itself; flat or
    ImageNet-style class sub-folders, any image suffix, sorted by path."""

    name = "image_folder"
    has_labels = False

    def folder(self) -> Path:
        return self.root / self.split if (self.root / self.split).is_dir() else self.root

    def image_dirs(self) -> list[Path]:
        return [self.folder()]

    def samples(self) -> list[tuple[Path, Path | None]]:
        return [(path, None) for path in list_images(self.folder())]
