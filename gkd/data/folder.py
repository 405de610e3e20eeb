"""``folder``: a labelled dataset of your own, laid out like mmseg's ``BaseSegDataset`` or an Ultralytics
dataset (issue 36, "bring your own data").

Layouts (``img_dir`` at ROOT picks the second):

- ``ROOT/{split}/images`` with ``ROOT/{split}/masks``;
- mmseg's ``ROOT/img_dir/{split}`` with ``ROOT/ann_dir/{split}``.

An image pairs with the mask of the same name below its folder less the suffix (``a/x.jpg`` with
``a/x.png``; sub-folders allowed). Images: files ending in ``img_suffix`` (default: any format PIL reads,
JPEG, PNG, TIFF, WebP, BMP); masks: files ending in ``mask_suffix`` (default ``.png``). Without a masks
folder a split serves as an unlabelled (proxy) image set.

Classes come from the options or from ``ROOT/dataset.yaml``, which holds ``classes:`` (a list of names, or
an ``id: name`` map over ids 0..N-1), optionally ``palette:`` (a ``[r, g, b]`` per class, as a list or an
``id: colour`` map) and any other option below as its default: an option the recipe leaves at its default
is taken from the file.

Masks are either single-channel ids (8- or 16-bit PNG, or a palette PNG's indices), mapped to classes by
``label_map`` (raw id -> class id; unlisted ids are errors), else ``reduce_zero_label`` (0 ignored, k ->
k - 1), else kept; ``ignore_index`` marks unlabelled pixels. Or colour-coded RGB: ``palette[i]`` is class
``i``, ``ignore_colors`` are unlabelled, any other colour is an error naming the file.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, model_validator

from gkd.data.base import (
    ID_MODES,
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    RGB,
    ColorLabelReader,
    DataError,
    LabelMapper,
    default_palette,
    open_image,
)
from gkd.data.layouts import Layout, train_id_mapper

DATASET_YAML = "dataset.yaml"
COLOR_MODES = ("RGB", "RGBA")


class FolderOptions(BaseModel):
    """Options of the ``folder`` dataset (each may also stand in ``ROOT/dataset.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str] | dict[NonNegativeInt, str] | None = Field(
        None, description="class names: a list, or id -> name over ids 0..N-1 (default: from dataset.yaml)"
    )
    palette: list[RGB] | dict[NonNegativeInt, RGB] | None = Field(
        None, description="a colour per class (list or id -> colour); RGB masks are read through it"
    )
    img_suffix: str | None = Field(None, description="image file ending, e.g. '.jpg' (default: any image format)")
    mask_suffix: str = Field(".png", description="mask file ending, e.g. '_mask.png'")
    label_map: dict[NonNegativeInt, int] | None = Field(
        None, description="raw mask id -> class id (ignore_index: ignored); ids not listed are errors"
    )
    reduce_zero_label: bool = Field(False, description="mask id 0 is ignored and id k is class k - 1")
    ignore_index: NonNegativeInt = Field(IGNORE_INDEX, description="mask id of unlabelled pixels")
    ignore_colors: list[RGB] = Field(default_factory=list, description="RGB masks: colours of unlabelled pixels")

    @model_validator(mode="after")
    def _one_mapping(self) -> FolderOptions:
        if self.label_map is not None and self.reduce_zero_label:
            raise ValueError("label_map and reduce_zero_label exclude each other (put the reduction in label_map)")
        return self


def resolve_options(root: Path | None, options: FolderOptions) -> tuple[FolderOptions, str]:
    """``(options, where)``: the options over ``ROOT/dataset.yaml`` (an option left at its default is taken
    from the file) and where the classes come from, for messages."""
    path = None if root is None else Path(root) / DATASET_YAML
    if path is None or not path.is_file():
        return options, "the folder dataset's options"
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise DataError(f"{path}: unreadable ({error})") from error
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a mapping with 'classes:', got {type(content).__name__}")
    defaults = FolderOptions()
    chosen = {key: value for key, value in options if value != getattr(defaults, key)}
    try:
        return FolderOptions.model_validate({**content, **chosen}), str(path)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].lower()}" for e in error.errors())
        raise DataError(f"{path}: {problems}") from error


def _by_id(table: list | dict, what: str, where: str) -> list:
    """A list, or an ``id -> value`` map over ids ``0..N-1``, as a list in id order."""
    if isinstance(table, list):
        return table
    if sorted(table) != list(range(len(table))):
        raise DataError(f"{where}: {what} ids {sorted(table)} must be 0..N-1 (map other mask ids with label_map)")
    return [table[i] for i in range(len(table))]


def class_table(options: FolderOptions, where: str) -> tuple[tuple[str, ...], tuple[RGB, ...], bool]:
    """``(class names, palette, whether the palette was given)``; no classes gives empty tuples."""
    if options.classes is None:
        return (), (), False
    classes = tuple(_by_id(options.classes, "class", where))
    if options.palette is None:
        return classes, tuple(default_palette(len(classes))), False
    palette = tuple(tuple(color) for color in _by_id(options.palette, "palette", where))
    if len(palette) != len(classes):
        raise DataError(f"{where}: palette has {len(palette)} colours for {len(classes)} classes")
    return classes, palette, True


def id_table(options: FolderOptions, num_classes: int, where: str) -> dict[int, int]:
    """Raw mask id -> class id (``IGNORE_INDEX`` for ignored ids)."""
    ignore = options.ignore_index
    if options.label_map is not None:
        bad = sorted({c for c in options.label_map.values() if not (0 <= c < num_classes or c == ignore)})
        if bad:
            raise DataError(f"{where}: label_map targets {bad} are neither class ids 0..{num_classes - 1} nor {ignore}")
        table = {raw: IGNORE_INDEX if c == ignore else c for raw, c in options.label_map.items()}
    elif options.reduce_zero_label:
        table = {0: IGNORE_INDEX, **{k: k - 1 for k in range(1, num_classes + 1)}}
    else:
        table = {k: k for k in range(num_classes)}
    return {**table, ignore: IGNORE_INDEX}


class Folder(Layout):
    """A labelled (or images-only) dataset of your own; see the module docstring."""

    name = "folder"
    Options = FolderOptions

    def __init__(self, root: Path, split: str, options: BaseModel) -> None:
        super().__init__(root, split, options)
        self.settings, self.where = resolve_options(self.root, options)
        self.classes, self.palette, colored = class_table(self.settings, self.where)
        self.mmseg = (self.root / "img_dir").is_dir()
        self.id_mapper = LabelMapper(id_table(self.settings, len(self.classes), self.where))
        ignored = {tuple(color): IGNORE_INDEX for color in self.settings.ignore_colors}
        colors = {**{color: i for i, color in enumerate(self.palette)}, **ignored}
        self.colors = ColorLabelReader(colors) if colored else None

    @classmethod
    def class_info(cls, root: Path | None, options: BaseModel) -> tuple[tuple[str, ...], tuple[RGB, ...]]:
        settings, where = resolve_options(root, options)
        return class_table(settings, where)[:2]

    def image_dirs(self) -> list[Path]:
        return [self.root / "img_dir" / self.split if self.mmseg else self.root / self.split / "images"]

    def label_dirs(self) -> list[Path]:
        return [self.root / "ann_dir" / self.split if self.mmseg else self.root / self.split / "masks"]

    def extra_paths(self) -> dict[str, Path]:
        return {"dataset_yaml": self.root / DATASET_YAML}

    def describe(self) -> dict:
        return {"layout": "mmseg" if self.mmseg else "split/images+masks", **super().describe()}

    def check(self, labeled: bool) -> None:
        super().check(labeled)
        if labeled and not self.classes:
            raise DataError(
                f"{self.root}: the folder dataset has no classes: write {self.root / DATASET_YAML} with "
                "'classes:' or give options.classes"
            )

    def _files(self, folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
        """``{name less suffix: file}`` below ``folder``; two files of one name are an error naming both."""
        found: dict[str, Path] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            suffix = next((s for s in suffixes if name.lower().endswith(s.lower())), None)
            if suffix is None:
                continue
            key = name[: len(name) - len(suffix)]
            if key in found:
                raise DataError(f"{path}: same name as {found[key]} (which one pairs with the mask?)")
            found[key] = path
        return found

    @cached_property
    def _images(self) -> dict[str, Path]:
        suffixes = IMAGE_SUFFIXES if self.settings.img_suffix is None else (self.settings.img_suffix,)
        return self._files(self.image_dirs()[0], suffixes)

    def samples(self) -> list[tuple[Path, Path | None]]:
        masks = self.label_dirs()[0]
        return sorted((image, masks / f"{key}{self.settings.mask_suffix}") for key, image in self._images.items())

    def unpaired(self) -> list[str]:
        masks = self._files(self.label_dirs()[0], (self.settings.mask_suffix,))
        folder = self.image_dirs()[0]
        return [f"{mask}: mask without an image in {folder}" for key, mask in masks.items() if key not in self._images]

    def label_mapper(self) -> LabelMapper:
        return train_id_mapper(len(self.classes))  # read_label already gives class ids

    def read_label(self, path: Path) -> np.ndarray:
        """Class ids (``IGNORE_INDEX`` where unlabelled) of a mask: ids through the mapping, RGB through the palette."""
        mask = open_image(path)
        if mask.mode in COLOR_MODES:
            if self.colors is None:
                raise DataError(f"{path}: colour-coded mask, but no palette: give 'palette:' in {DATASET_YAML}")
            return self.colors.decode(mask, path)
        if mask.mode not in ID_MODES:
            raise DataError(f"{path}: mask has mode {mask.mode}, expected single-channel ids or RGB colours")
        return self.id_mapper(np.asarray(mask).astype(np.int64), path)
