"""The recipe-facing dataset config, the registry of datasets, and build / describe / inspect.

``build_dataset(config)`` returns a ``Selection``: the split's samples (sorted by path), the seeded label
fraction of them, the first ``limit`` of those, each served through the transform.

Bad input: a missing root or split folder is always a ``DataError`` naming the path. An image without
its label, a label without its image (``folder``) or a listed image that is absent is found at
construction. Decode errors (corrupt or truncated files), a label whose size differs from its image and
label ids outside the dataset's table are found when a sample is loaded. Without ``skip_bad`` each is a
``DataError`` naming the file. With ``skip_bad``, construction drops unpaired samples and then runs a
*validity pass* that loads every selected sample once (on threads) and drops those that fail, so the
dataset's length is final before training starts (samplers, DDP ranks and resumed runs all index the
same list); each dropped sample is logged on ``gkd.data`` and listed in ``dataset.skipped``. Nothing is
ever replaced by a guess.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch.utils.data import Dataset

from gkd.data.base import (
    IGNORE_INDEX,
    RGB,
    CachedDataset,
    DataError,
    ImageListDataset,
    Sample,
    SegmentationDataset,
    Selection,
    Transform,
    default_palette,
    load_problems,
    parallel_map,
)
from gkd.data.camvid import CamVid
from gkd.data.driving import ACDC, BDD100K, GTAV, Cityscapes
from gkd.data.folder import Folder
from gkd.data.fractions import FractionName, fraction_indices, fraction_value
from gkd.data.isprs import Potsdam, Vaihingen
from gkd.data.layouts import ImageFolder, Layout
from gkd.data.mapillary import Mapillary
from gkd.data.synthia_urbansyn import SYNTHIA, UrbanSyn

log = logging.getLogger("gkd.data")

LAYOUTS: dict[str, type[Layout]] = {
    layout.name: layout
    for layout in (
        *(GTAV, SYNTHIA, UrbanSyn, Cityscapes, BDD100K, Mapillary, ACDC),
        *(Potsdam, Vaihingen, CamVid, Folder, ImageFolder),
    )
}
SYNTHETIC = "synthetic"
DATASET_NAMES: tuple[str, ...] = (*LAYOUTS, SYNTHETIC)


def _synthetic():
    """The generated data of the embedded default, imported only when a recipe names it."""
    from gkd.data import synthetic

    return synthetic


def options_model(name: str) -> type[BaseModel]:
    """The pydantic model that validates ``options`` of dataset ``name``."""
    if name == SYNTHETIC:
        return _synthetic().SyntheticOptions
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    return LAYOUTS[name].Options


def validate_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options completed with their defaults (JSON types), or a ``ValueError`` naming the bad key."""
    try:
        return options_model(name).model_validate(options).model_dump(mode="json")
    except ValidationError as error:
        raise ValueError(f"options of dataset {name!r}: {error}") from error


class DatasetConfig(BaseModel):
    """One split of one dataset, as a recipe names it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"registry key: {', '.join(DATASET_NAMES)}")
    root: Path | None = Field(None, description="the dataset's folder (synthetic: unused)")
    split: str = "train"
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific, see its Options")
    fraction: FractionName | float = Field("full", description="label fraction of the split (seeded, nested)")
    fraction_seed: int = 0
    limit: int | None = Field(None, gt=0, description="first N samples after the fraction")
    skip_bad: bool = Field(False, description="skip (and log) bad samples instead of stopping")
    cache: bool = Field(False, description="keep decoded images in memory (small datasets; one copy per loader worker)")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
        return name

    @field_validator("root")
    @classmethod
    def _expand(cls, root: Path | None) -> Path | None:
        return None if root is None else root.expanduser()

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, fraction: str | float) -> str | float:
        fraction_value(fraction)
        return fraction

    @model_validator(mode="after")
    def _options(self) -> DatasetConfig:
        self.options = validate_options(self.name, self.options)
        return self


def dataset_info(dataset: str | DatasetConfig) -> tuple[int, tuple[str, ...], tuple[RGB, ...]]:
    """``(num_classes, class_names, palette)`` of a dataset, by name or by config (``0, (), ()`` for unlabeled
    image folders). ``folder`` takes its classes from the config's options or root's ``dataset.yaml``, so its
    name alone gives ``0, (), ()``."""
    name = dataset if isinstance(dataset, str) else dataset.name
    if name == SYNTHETIC:
        classes = tuple(_synthetic().SYNTHETIC_CLASSES)
        return len(classes), classes, tuple(default_palette(len(classes)))
    options_model(name)  # unknown names fail here
    layout = LAYOUTS[name]
    if isinstance(dataset, str):
        classes, palette = layout.classes, layout.palette
    else:
        classes, palette = layout.class_info(dataset.root, layout.Options.model_validate(dataset.options))
    return len(classes), classes, palette


def _layout(config: DatasetConfig) -> Layout:
    if config.root is None:
        raise DataError(f"{config.name}: no root given")
    layout = LAYOUTS[config.name]
    return layout(config.root, config.split, layout.Options.model_validate(config.options))


def _name_of(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _split_dataset(
    config: DatasetConfig, transform: Transform | None, labeled: bool
) -> tuple[Dataset, list[str], list[str]]:
    """The whole split: ``(dataset, sample names, skipped)``, pairing checked."""
    if config.name == SYNTHETIC:
        module = _synthetic()
        dataset = module.SyntheticSegmentation(
            module.SyntheticOptions.model_validate(config.options), config.split, transform, labeled
        )
        return dataset, [str(i) for i in range(len(dataset))], []
    layout = _layout(config)
    if labeled and not layout.has_labels:
        raise DataError(f"{config.root}: {config.name} has no labels (use it as an unlabeled proxy set)")
    layout.check(labeled)
    kept, skipped = [], layout.unpaired() if labeled else []
    for image, label in layout.samples():
        if not image.is_file():
            skipped.append(f"{image}: image file not found")
        elif labeled and not label.is_file():
            skipped.append(f"{label}: label file not found (for image {image})")
        else:
            kept.append((image, label))
    if skipped and not config.skip_bad:
        raise DataError(skipped[0] + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    for problem in skipped:
        log.warning("skipping: %s", problem)
    if not kept:
        folders = ", ".join(str(p) for p in layout.image_dirs())
        raise DataError(f"{folders}: no {config.name} samples in split '{config.split}' (options {config.options})")
    names = [_name_of(image, layout.root) for image, _ in kept]
    if not labeled:
        return ImageListDataset([image for image, _ in kept], transform), names, skipped
    dataset = SegmentationDataset(
        kept,
        layout.label_mapper(),
        len(layout.classes),
        layout.classes,
        transform,
        label_reader=layout.read_label,
        image_reader=layout.read_image,
    )
    return dataset, names, skipped


def _selection(config: DatasetConfig, transform: Transform | None, labeled: bool, validate: bool) -> Selection:
    dataset, names, skipped = _split_dataset(config, transform, labeled)
    if config.cache:
        dataset = CachedDataset(dataset)
    chosen = fraction_indices(len(dataset), config.fraction, config.fraction_seed)
    used = chosen[: config.limit] if config.limit else chosen
    if validate:
        problems = list(load_problems(dataset, used))
        for message in filter(None, problems):
            log.warning("skipping: %s", message)
        skipped += list(filter(None, problems))
        used = [index for index, message in zip(used, problems, strict=True) if message is None]
    num_classes, class_names, palette = dataset_info(config)
    info = {
        **config.model_dump(mode="json", include={"name", "root", "split", "fraction", "fraction_seed", "limit"}),
        "labeled": labeled,
        "num_classes": num_classes,
        "class_names": list(class_names),
        "palette": [list(color) for color in palette],
    }
    log.info(
        "%s %s: %d samples, fraction %s -> %d, using %d (%d skipped)",
        config.name, config.split, len(dataset), config.fraction, len(chosen), len(used), len(skipped),
    )  # fmt: skip
    return Selection(dataset, names, chosen, used, skipped, info)


def build_dataset(config: DatasetConfig, transform: Transform | None = None, labeled: bool = True) -> Selection:
    """The dataset a config names; ``labeled=False`` gives images only (labels neither read nor needed)."""
    return _selection(config, transform, labeled, validate=config.skip_bad)


def describe_dataset(config: DatasetConfig) -> dict:
    """Resolved folders and which expected ones are missing (for ``--dry-run``); reads no image."""
    if config.name == SYNTHETIC:
        return {"generated": True, "split": config.split, "options": config.options, "missing": []}
    if config.root is None:
        return {"root": None, "missing": [f"{config.name}: no root given"]}
    return {"root": str(config.root), "split": config.split, **_layout(config).describe()}


def inspect_dataset(config: DatasetConfig) -> dict:
    """Sample count and pixels per train id over the split (after the fraction / limit of ``config``),
    after the label mapping, at native resolution; with ``skip_bad`` bad samples are counted out and
    listed under ``skipped``."""
    selection = _selection(config, None, labeled=True, validate=False)
    num_classes = selection.num_classes

    def count(index: int) -> tuple[np.ndarray, str] | DataError:
        try:
            sample: Sample = selection.load(index)
        except DataError as error:
            if config.skip_bad:
                return error
            raise
        _, height, width = sample["image"].shape
        return np.bincount(sample["label"].numpy().ravel(), minlength=IGNORE_INDEX + 1), f"{width}x{height}"

    pixels = np.zeros(IGNORE_INDEX + 1, dtype=np.int64)
    sizes: dict[str, int] = {}
    skipped = list(selection.skipped)
    for result in parallel_map(count, range(len(selection))):
        if isinstance(result, DataError):
            log.warning("skipping: %s", result)
            skipped.append(str(result))
            continue
        counts, size = result
        pixels += counts
        sizes[size] = sizes.get(size, 0) + 1
    return {
        "name": config.name,
        "root": None if config.root is None else str(config.root),
        "split": config.split,
        "num_samples": sum(sizes.values()),
        "num_classes": num_classes,
        "class_names": selection.class_names,
        "class_pixels": pixels[:num_classes].tolist(),
        "ignored_pixels": int(pixels[IGNORE_INDEX]),
        "image_sizes": sizes,
        "skipped": skipped,
    }
