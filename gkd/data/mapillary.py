"""Mapillary Vistas v1.2, evaluated on the 19 Cityscapes classes.

Layout: ``{split}/images/*.jpg`` with ``{split}/labels/*.png`` (v1.1/v1.2 downloads) or
``{split}/v1.2/labels/*.png`` (the v2.0 download, which ships both label versions; v1.2 is used).
Split folders are ``training`` / ``validation``; ``train`` / ``val`` are accepted for them. Labels are
palette PNGs whose indices are the 66 v1.2 class ids (65 = unlabeled).

Class list and colours: the dataset's ``config_v1.2.json`` (as copied in detectron2 / Mask2Former's
``register_mapillary_vistas.py``). The 66 -> 19 table is the one the DG segmentation works built on
Rein use: Rein's ``tools/convert_datasets/mapillary2cityscape.py`` (from openseg.pytorch) matches the
v1.2 ``readable`` names by rule (exact Cityscapes name; traffic sign / front / back -> traffic sign;
on rails -> train; cyclist / rider -> rider; pole / street light -> pole; curb / pedestrian area ->
sidewalk; crosswalk plain / parking / bike lane / service lane / lane marking -> road; the rest void).
Those rules applied to the v1.2 names give the table below, written out here as data. Note it maps
traffic-sign backs and frames to traffic sign, unlike narrower tables (e.g. tue-mps/benchmark-vfm-ss).

``options.half_resolution``: the GKD code scores Mapillary on a half-size copy of the validation set
(its ``tools/convert_datasets/mapillary_resize.py``: images halved bicubic, labels halved nearest, read from
``half/val_img`` / ``half/val_label``). With the option the original files are halved the same way on read,
so mIoU is counted on half-resolution labels as in the paper's Mapillary column.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from gkd.data.base import IGNORE_INDEX, LabelMapper, read_image, read_label
from gkd.data.driving import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from gkd.data.layouts import Layout, glob_sorted, split_alias


class MapillaryLabel(NamedTuple):
    name: str
    color: tuple[int, int, int]
    cityscapes: str | None  # the Cityscapes class it counts as; None = ignored


MAPILLARY_V12_LABELS: tuple[MapillaryLabel, ...] = (
    MapillaryLabel("animal--bird", (165, 42, 42), None),
    MapillaryLabel("animal--ground-animal", (0, 192, 0), None),
    MapillaryLabel("construction--barrier--curb", (196, 196, 196), "sidewalk"),
    MapillaryLabel("construction--barrier--fence", (190, 153, 153), "fence"),
    MapillaryLabel("construction--barrier--guard-rail", (180, 165, 180), None),
    MapillaryLabel("construction--barrier--other-barrier", (90, 120, 150), None),
    MapillaryLabel("construction--barrier--wall", (102, 102, 156), "wall"),
    MapillaryLabel("construction--flat--bike-lane", (128, 64, 255), "road"),
    MapillaryLabel("construction--flat--crosswalk-plain", (140, 140, 200), "road"),
    MapillaryLabel("construction--flat--curb-cut", (170, 170, 170), "sidewalk"),
    MapillaryLabel("construction--flat--parking", (250, 170, 160), "road"),
    MapillaryLabel("construction--flat--pedestrian-area", (96, 96, 96), "sidewalk"),
    MapillaryLabel("construction--flat--rail-track", (230, 150, 140), None),
    MapillaryLabel("construction--flat--road", (128, 64, 128), "road"),
    MapillaryLabel("construction--flat--service-lane", (110, 110, 110), "road"),
    MapillaryLabel("construction--flat--sidewalk", (244, 35, 232), "sidewalk"),
    MapillaryLabel("construction--structure--bridge", (150, 100, 100), None),
    MapillaryLabel("construction--structure--building", (70, 70, 70), "building"),
    MapillaryLabel("construction--structure--tunnel", (150, 120, 90), None),
    MapillaryLabel("human--person", (220, 20, 60), "person"),
    MapillaryLabel("human--rider--bicyclist", (255, 0, 0), "rider"),
    MapillaryLabel("human--rider--motorcyclist", (255, 0, 100), "rider"),
    MapillaryLabel("human--rider--other-rider", (255, 0, 200), "rider"),
    MapillaryLabel("marking--crosswalk-zebra", (200, 128, 128), "road"),
    MapillaryLabel("marking--general", (255, 255, 255), "road"),
    MapillaryLabel("nature--mountain", (64, 170, 64), None),
    MapillaryLabel("nature--sand", (230, 160, 50), None),
    MapillaryLabel("nature--sky", (70, 130, 180), "sky"),
    MapillaryLabel("nature--snow", (190, 255, 255), None),
    MapillaryLabel("nature--terrain", (152, 251, 152), "terrain"),
    MapillaryLabel("nature--vegetation", (107, 142, 35), "vegetation"),
    MapillaryLabel("nature--water", (0, 170, 30), None),
    MapillaryLabel("object--banner", (255, 255, 128), None),
    MapillaryLabel("object--bench", (250, 0, 30), None),
    MapillaryLabel("object--bike-rack", (100, 140, 180), None),
    MapillaryLabel("object--billboard", (220, 220, 220), None),
    MapillaryLabel("object--catch-basin", (220, 128, 128), None),
    MapillaryLabel("object--cctv-camera", (222, 40, 40), None),
    MapillaryLabel("object--fire-hydrant", (100, 170, 30), None),
    MapillaryLabel("object--junction-box", (40, 40, 40), None),
    MapillaryLabel("object--mailbox", (33, 33, 33), None),
    MapillaryLabel("object--manhole", (100, 128, 160), None),
    MapillaryLabel("object--phone-booth", (142, 0, 0), None),
    MapillaryLabel("object--pothole", (70, 100, 150), None),
    MapillaryLabel("object--street-light", (210, 170, 100), "pole"),
    MapillaryLabel("object--support--pole", (153, 153, 153), "pole"),
    MapillaryLabel("object--support--traffic-sign-frame", (128, 128, 128), "traffic sign"),
    MapillaryLabel("object--support--utility-pole", (0, 0, 80), "pole"),
    MapillaryLabel("object--traffic-light", (250, 170, 30), "traffic light"),
    MapillaryLabel("object--traffic-sign--back", (192, 192, 192), "traffic sign"),
    MapillaryLabel("object--traffic-sign--front", (220, 220, 0), "traffic sign"),
    MapillaryLabel("object--trash-can", (140, 140, 20), None),
    MapillaryLabel("object--vehicle--bicycle", (119, 11, 32), "bicycle"),
    MapillaryLabel("object--vehicle--boat", (150, 0, 255), None),
    MapillaryLabel("object--vehicle--bus", (0, 60, 100), "bus"),
    MapillaryLabel("object--vehicle--car", (0, 0, 142), "car"),
    MapillaryLabel("object--vehicle--caravan", (0, 0, 90), None),
    MapillaryLabel("object--vehicle--motorcycle", (0, 0, 230), "motorcycle"),
    MapillaryLabel("object--vehicle--on-rails", (0, 80, 100), "train"),
    MapillaryLabel("object--vehicle--other-vehicle", (128, 64, 64), None),
    MapillaryLabel("object--vehicle--trailer", (0, 0, 110), None),
    MapillaryLabel("object--vehicle--truck", (0, 0, 70), "truck"),
    MapillaryLabel("object--vehicle--wheeled-slow", (0, 0, 192), None),
    MapillaryLabel("void--car-mount", (32, 32, 32), None),
    MapillaryLabel("void--ego-vehicle", (120, 10, 10), None),
    MapillaryLabel("void--unlabeled", (0, 0, 0), None),
)
MAPILLARY_TO_CITYSCAPES: dict[int, int] = {
    index: IGNORE_INDEX if label.cityscapes is None else CITYSCAPES_CLASSES.index(label.cityscapes)
    for index, label in enumerate(MAPILLARY_V12_LABELS)
}
SPLIT_FOLDERS = {"train": "training", "val": "validation", "test": "testing"}


class MapillaryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    half_resolution: bool = Field(
        False, description="halve images (bicubic) and labels (nearest) on read, as the GKD code scores Mapillary"
    )


def _halve(array: np.ndarray, resample: Image.Resampling) -> np.ndarray:
    """``array`` at ``(H // 2, W // 2)`` by PIL (as the GKD code's mapillary_resize.py does it)."""
    height, width = array.shape[:2]
    return np.array(Image.fromarray(array).resize((width // 2, height // 2), resample=resample))


class Mapillary(Layout):
    """Mapillary Vistas v1.2 mapped to the 19 Cityscapes classes (see the module docstring)."""

    name = "mapillary"
    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    Options = MapillaryOptions

    def read_image(self, path: Path) -> np.ndarray:
        image = read_image(path)
        return _halve(image, Image.Resampling.BICUBIC) if self.options.half_resolution else image

    def read_label(self, path: Path) -> np.ndarray:
        ids = read_label(path)
        if not self.options.half_resolution:
            return ids
        return _halve(ids.astype(np.uint8), Image.Resampling.NEAREST).astype(np.int64)

    def split_dir(self) -> Path:
        return self.root / split_alias(self.split, SPLIT_FOLDERS, self.root)

    def image_dirs(self) -> list[Path]:
        return [self.split_dir() / "images"]

    def label_dirs(self) -> list[Path]:
        versioned = self.split_dir() / "v1.2" / "labels"
        return [versioned if versioned.is_dir() else self.split_dir() / "labels"]

    def samples(self) -> list[tuple[Path, Path | None]]:
        labels = self.label_dirs()[0]
        return [(image, labels / f"{image.stem}.png") for image in glob_sorted(self.image_dirs()[0], "*.jpg")]

    def label_mapper(self) -> LabelMapper:
        return LabelMapper(MAPILLARY_TO_CITYSCAPES)
