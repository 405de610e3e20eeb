"""ISPRS 2D semantic labeling: Potsdam (RGB or IRRG) and Vaihingen (IRRG), 6 classes.

Two on-disk layouts (``options.layout``; ``auto`` picks ``mmseg`` when ``img_dir`` exists):

- ``mmseg``: mmsegmentation's converted tiles, ``img_dir/{split}/*.png`` with ``ann_dir/{split}/*.png``.
  mmseg's converters (``tools/dataset_converters/potsdam.py`` / ``vaihingen.py``) read the colour label
  tile with ``mmcv.imread`` (BGR) and number its colours 0 = black (boundary / unknown colour),
  1 impervious, 2 building, 3 low vegetation, 4 tree, 5 car, 6 clutter; mmseg's datasets load them with
  ``reduce_zero_label=True`` (0 -> 255, k -> k - 1). Clutter therefore stays a class (id 5) and only the
  eroded boundary is ignored; the same is done here. Which image tiles (RGB or IRRG) a converted root
  holds is up to whoever converted it: ``modality`` only picks the folder in the ``original`` layout.
- ``original``: the tiles as the ISPRS zips unpack, colour-coded labels (RGB -> id below, black =
  eroded boundary -> ignore, any other colour an error). Potsdam: ``2_Ortho_RGB/top_potsdam_{tile}_RGB.tif``
  or ``3_Ortho_IRRG/top_potsdam_{tile}_IRRG.tif`` with ``5_Labels_all_noBoundary/
  top_potsdam_{tile}_label_noBoundary.tif`` (eroded, what mmseg uses) or ``5_Labels_all/
  top_potsdam_{tile}_label.tif``. Vaihingen: ``top/top_mosaic_09cm_{area}.tif`` with
  ``ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE/top_mosaic_09cm_{area}_noBoundary.tif``
  or ``ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE/top_mosaic_09cm_{area}.tif`` (each label
  zip unpacked into a folder of its name). Splits: mmseg's converter tile lists; ``all`` = both.
  Whole tiles are large (Potsdam 6000x6000): convert with mmseg's tools for training speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gkd.data.base import IGNORE_INDEX, ColorLabelReader, DataError, LabelMapper, read_label
from gkd.data.layouts import Layout, glob_sorted, train_id_mapper

ISPRS_CLASSES = ("impervious surfaces", "building", "low vegetation", "tree", "car", "clutter")
ISPRS_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
ISPRS_COLOR_TO_ID = {**{color: i for i, color in enumerate(ISPRS_PALETTE)}, (0, 0, 0): IGNORE_INDEX}
MMSEG_ID_TO_TRAIN_ID = {0: IGNORE_INDEX, **{i + 1: i for i in range(len(ISPRS_CLASSES))}, IGNORE_INDEX: IGNORE_INDEX}

POTSDAM_TILES = {
    "train": ("2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
              "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11", "7_12", "7_7", "7_8", "7_9"),
    "val": ("5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14", "5_13", "4_13",
            "3_14", "7_13"),
}  # fmt: skip
VAIHINGEN_AREAS = {
    "train": ("area1", "area11", "area13", "area15", "area17", "area21", "area23", "area26", "area28", "area3",
              "area30", "area32", "area34", "area37", "area5", "area7"),
    "val": ("area6", "area24", "area35", "area16", "area14", "area22", "area10", "area4", "area2", "area20",
            "area8", "area31", "area33", "area27", "area38", "area12", "area29"),
}  # fmt: skip


class _ISPRSOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layout: Literal["auto", "mmseg", "original"] = Field("auto", description="auto: mmseg if img_dir exists")
    eroded: bool = Field(True, description="original layout: boundary-eroded labels (noBoundary), as mmseg")


class PotsdamOptions(_ISPRSOptions):
    modality: Literal["rgb", "irrg"] = "rgb"


class VaihingenOptions(_ISPRSOptions):
    modality: Literal["irrg"] = "irrg"


class _ISPRS(Layout):
    classes = ISPRS_CLASSES
    palette = ISPRS_PALETTE
    tiles: dict[str, tuple[str, ...]]

    def __init__(self, root: Path, split: str, options: BaseModel) -> None:
        super().__init__(root, split, options)
        self.kind = options.layout
        if self.kind == "auto":
            self.kind = "mmseg" if (self.root / "img_dir").is_dir() else "original"
        self._colors = ColorLabelReader(ISPRS_COLOR_TO_ID)

    def original_dirs(self) -> tuple[Path, Path]:
        """Image and label folders of the original layout."""
        raise NotImplementedError

    def original_names(self, tile: str) -> tuple[str, str]:
        """Image and label file names of one tile in the original layout."""
        raise NotImplementedError

    def image_dirs(self) -> list[Path]:
        return [self.root / "img_dir" / self.split if self.kind == "mmseg" else self.original_dirs()[0]]

    def label_dirs(self) -> list[Path]:
        return [self.root / "ann_dir" / self.split if self.kind == "mmseg" else self.original_dirs()[1]]

    def check(self, labeled: bool) -> None:
        if self.kind == "original" and self.split not in (*self.tiles, "all"):
            raise DataError(f"{self.root}: {self.name} (original tiles) has no split '{self.split}' (train, val, all)")
        super().check(labeled)

    def describe(self) -> dict:
        return {"layout": self.kind, **super().describe()}

    def samples(self) -> list[tuple[Path, Path | None]]:
        if self.kind == "mmseg":
            images, labels = self.image_dirs()[0], self.label_dirs()[0]
            return [(image, labels / image.name) for image in glob_sorted(images, "*.png")]
        splits = tuple(self.tiles) if self.split == "all" else (self.split,)
        (image_dir, label_dir), pairs = self.original_dirs(), []
        for tile in (tile for split in splits for tile in self.tiles[split]):
            image, label = self.original_names(tile)
            pairs.append((image_dir / image, label_dir / label))
        return sorted(pairs)

    def read_label(self, path: Path) -> np.ndarray:
        return read_label(path) if self.kind == "mmseg" else self._colors(path)

    def label_mapper(self) -> LabelMapper:
        return LabelMapper(MMSEG_ID_TO_TRAIN_ID) if self.kind == "mmseg" else train_id_mapper(len(ISPRS_CLASSES))


class Potsdam(_ISPRS):
    """ISPRS Potsdam, RGB or IRRG tiles (see the module docstring)."""

    name = "potsdam"
    Options = PotsdamOptions
    tiles = POTSDAM_TILES

    def original_dirs(self) -> tuple[Path, Path]:
        images = "2_Ortho_RGB" if self.options.modality == "rgb" else "3_Ortho_IRRG"
        return self.root / images, self.root / ("5_Labels_all_noBoundary" if self.options.eroded else "5_Labels_all")

    def original_names(self, tile: str) -> tuple[str, str]:
        image = f"top_potsdam_{tile}_{self.options.modality.upper()}.tif"
        return image, f"top_potsdam_{tile}_label{'_noBoundary' if self.options.eroded else ''}.tif"


class Vaihingen(_ISPRS):
    """ISPRS Vaihingen, IRRG tiles (see the module docstring)."""

    name = "vaihingen"
    Options = VaihingenOptions
    tiles = VAIHINGEN_AREAS

    def original_dirs(self) -> tuple[Path, Path]:
        labels = f"ISPRS_semantic_labeling_Vaihingen_ground_truth{'_eroded' if self.options.eroded else ''}_COMPLETE"
        return self.root / "top", self.root / labels

    def original_names(self, tile: str) -> tuple[str, str]:
        image = f"top_mosaic_09cm_{tile}.tif"
        return image, f"top_mosaic_09cm_{tile}_noBoundary.tif" if self.options.eroded else image
