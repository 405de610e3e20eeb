"""Driving scenes with the 19 Cityscapes classes: GTAV, Cityscapes, BDD100K, ACDC (Mapillary Vistas
in ``mapillary.py``).

The label table is cityscapesScripts' ``helpers/labels.py`` (github.com/mcordts/cityscapesScripts):
label id -> train id, 255 for classes not evaluated. ``license plate`` (id -1) is never written to
``*_labelIds.png`` (json2labelImg skips negative ids), so stored ids are 0..33; any other id is an error.
GTAV (Playing for Data, Richter et al. ECCV 2016) stores the same Cityscapes label ids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gkd.data.base import IGNORE_INDEX, DataError, LabelMapper
from gkd.data.layouts import Layout, glob_sorted, train_id_mapper

log = logging.getLogger("gkd.data")


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int
    color: tuple[int, int, int]


CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, IGNORE_INDEX, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, IGNORE_INDEX, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, IGNORE_INDEX, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, IGNORE_INDEX, (0, 0, 0)),
    CityscapesLabel("static", 4, IGNORE_INDEX, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, IGNORE_INDEX, (111, 74, 0)),
    CityscapesLabel("ground", 6, IGNORE_INDEX, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, IGNORE_INDEX, (250, 170, 160)),
    CityscapesLabel("rail track", 10, IGNORE_INDEX, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, IGNORE_INDEX, (180, 165, 180)),
    CityscapesLabel("bridge", 15, IGNORE_INDEX, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, IGNORE_INDEX, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, IGNORE_INDEX, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, IGNORE_INDEX, (0, 0, 90)),
    CityscapesLabel("trailer", 30, IGNORE_INDEX, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
)
_EVALUATED = sorted((label for label in CITYSCAPES_LABELS if label.train_id != IGNORE_INDEX), key=lambda x: x.train_id)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(label.name for label in _EVALUATED)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(label.color for label in _EVALUATED)
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {label.id: label.train_id for label in CITYSCAPES_LABELS}


class _CityscapesClasses(Layout):
    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def label_mapper(self) -> LabelMapper:
        return train_id_mapper(len(CITYSCAPES_CLASSES))


class GTAV(_CityscapesClasses):
    """GTAV (Playing for Data): ``images/NNNNN.png``, ``labels/NNNNN.png`` (palette PNGs whose indices
    are Cityscapes label ids). Splits ``train`` / ``val`` / ``test`` come from the dataset's standard
    ``split.mat`` (keys ``trainIds``, ``valIds``, ``testIds``: 1-based frame numbers) when it is in the
    root, else every split is all images (DG works train on all 24,966); ``all`` is always all images."""

    name = "gtav"
    splits = ("train", "val", "test", "all")

    def split_file(self) -> Path:
        return self.root / "split.mat"

    def image_dirs(self) -> list[Path]:
        return [self.root / "images"]

    def label_dirs(self) -> list[Path]:
        return [self.root / "labels"]

    def extra_paths(self) -> dict[str, Path]:
        return {"split_file": self.split_file()}

    def check(self, labeled: bool) -> None:
        if self.split not in self.splits:
            raise DataError(f"{self.root}: gtav has no split '{self.split}' (splits: {', '.join(self.splits)})")
        super().check(labeled)

    def _split_frames(self) -> list[int]:
        path = self.split_file()
        try:
            from scipy.io import loadmat
        except ImportError as error:
            raise DataError(f"{path}: reading GTAV's split.mat needs scipy (pip install scipy)") from error
        try:
            split = loadmat(path)
        except (ValueError, OSError, TypeError) as error:
            raise DataError(f"{path}: unreadable split file ({error})") from error
        key = f"{self.split}Ids"
        if key not in split:
            raise DataError(f"{path}: no '{key}' in the split file")
        return sorted(int(frame) for frame in np.asarray(split[key]).ravel())

    def samples(self) -> list[tuple[Path, Path | None]]:
        if self.split != "all" and self.split_file().is_file():
            names = [f"{frame:05d}.png" for frame in self._split_frames()]
        else:
            if self.split != "all":
                log.warning("%s: no split.mat, split '%s' is all GTAV images", self.root, self.split)
            names = [path.name for path in glob_sorted(self.root / "images", "*.png")]
        return [(self.root / "images" / name, self.root / "labels" / name) for name in names]

    def label_mapper(self) -> LabelMapper:
        return LabelMapper(CITYSCAPES_ID_TO_TRAIN_ID)


class CityscapesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: Literal["labelIds", "labelTrainIds"] = Field(
        "labelIds",
        description="labelIds: the official files, mapped with the table; labelTrainIds: the files "
        "cityscapesScripts' createTrainIdLabelImgs writes (what mmseg reads)",
    )


class Cityscapes(_CityscapesClasses):
    """Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
    ``gtFine/{split}/{city}/*_gtFine_{labels}.png``."""

    name = "cityscapes"
    Options = CityscapesOptions

    def image_dirs(self) -> list[Path]:
        return [self.root / "leftImg8bit" / self.split]

    def label_dirs(self) -> list[Path]:
        return [self.root / "gtFine" / self.split]

    def samples(self) -> list[tuple[Path, Path | None]]:
        suffix = f"_gtFine_{self.options.labels}.png"
        labels = self.root / "gtFine" / self.split
        return [
            (image, labels / image.parent.name / (image.name[: -len("_leftImg8bit.png")] + suffix))
            for image in glob_sorted(self.root / "leftImg8bit" / self.split, "*/*_leftImg8bit.png")
        ]

    def label_mapper(self) -> LabelMapper:
        if self.options.labels == "labelIds":
            return LabelMapper(CITYSCAPES_ID_TO_TRAIN_ID)
        return super().label_mapper()


class BDD100K(_CityscapesClasses):
    """BDD100K semantic segmentation (10K images): ``images/10k/{split}/*.jpg`` with
    ``labels/sem_seg/masks/{split}/*.png`` (already train ids 0..18 and 255)."""

    name = "bdd100k"

    def image_dirs(self) -> list[Path]:
        return [self.root / "images" / "10k" / self.split]

    def label_dirs(self) -> list[Path]:
        return [self.root / "labels" / "sem_seg" / "masks" / self.split]

    def samples(self) -> list[tuple[Path, Path | None]]:
        masks = self.label_dirs()[0]
        return [(image, masks / f"{image.stem}.png") for image in glob_sorted(self.image_dirs()[0], "*.jpg")]


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


class ACDCOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    condition: Literal["all", "fog", "night", "rain", "snow"] = Field(
        "all", description="one adverse condition (each is a target domain), or all four"
    )


class ACDC(_CityscapesClasses):
    """ACDC: ``rgb_anon/{condition}/{split}/{sequence}/*_rgb_anon.png`` with
    ``gt/{condition}/{split}/{sequence}/*_gt_labelTrainIds.png`` (train ids 0..18 and 255)."""

    name = "acdc"
    Options = ACDCOptions

    def conditions(self) -> tuple[str, ...]:
        return ACDC_CONDITIONS if self.options.condition == "all" else (self.options.condition,)

    def image_dirs(self) -> list[Path]:
        return [self.root / "rgb_anon" / condition / self.split for condition in self.conditions()]

    def label_dirs(self) -> list[Path]:
        return [self.root / "gt" / condition / self.split for condition in self.conditions()]

    def samples(self) -> list[tuple[Path, Path | None]]:
        pairs = []
        for images, labels in zip(self.image_dirs(), self.label_dirs(), strict=True):
            for image in glob_sorted(images, "*/*_rgb_anon.png"):
                stem = image.name[: -len("_rgb_anon.png")]
                pairs.append((image, labels / image.parent.name / f"{stem}_gt_labelTrainIds.png"))
        return pairs
