"""The two further synthetic source domains of GKD's multi-source setting (GTAV + SYNTHIA + UrbanSyn, the
poster's Fig. 1; the GKD code's ``configs/_base_/datasets/dg_urbansyn_synthia_gta_512x512.py``), both on the
19 Cityscapes classes.

SYNTHIA (SYNTHIA-RAND-CITYSCAPES, Ros et al. CVPR 2016), as the GKD code reads it: ``RGB/<n>.png`` with
``GT/LABELS/<n>_labelTrainIds.png``, the Cityscapes train ids written by mmseg's
``tools/dataset_converters/synthia.py`` (the release's 16-bit SYNTHIA ids converted; its 16 classes, terrain,
truck and train never occur). Run that converter first; the raw 16-bit labels are refused by their file name.

UrbanSyn (Gómez et al. 2024): ``rgb/rgb_<n>.png`` with ``ss/ss_<n>.png`` (files of the same name in both
folders also pair). Labels are Cityscapes train ids 0..18 with 19 = unlabelled; the GKD code rewrites 19 to 255
on disk (``tools/convert_datasets/urbansyn.py``), here the label table maps 19 to ignore, so either copy works.
"""

from __future__ import annotations

from pathlib import Path

from gkd.data.base import IGNORE_INDEX, LabelMapper, identity_label_map
from gkd.data.driving import CITYSCAPES_CLASSES, _CityscapesClasses
from gkd.data.layouts import glob_sorted

URBANSYN_UNLABELED = 19


class SYNTHIA(_CityscapesClasses):
    """SYNTHIA-RAND-CITYSCAPES with mmseg-converted train-id labels; every frame is one split (``all``)."""

    name = "synthia"

    def image_dirs(self) -> list[Path]:
        return [self.root / "RGB"]

    def label_dirs(self) -> list[Path]:
        return [self.root / "GT" / "LABELS"]

    def samples(self) -> list[tuple[Path, Path | None]]:
        labels, images = self.label_dirs()[0], glob_sorted(self.image_dirs()[0], "*.png")
        return [(image, labels / f"{image.stem}_labelTrainIds.png") for image in images]


class UrbanSyn(_CityscapesClasses):
    """UrbanSyn: ``rgb/`` and ``ss/`` (train ids, 19 = unlabelled); every frame is one split (``all``)."""

    name = "urbansyn"

    def image_dirs(self) -> list[Path]:
        return [self.root / "rgb"]

    def label_dirs(self) -> list[Path]:
        return [self.root / "ss"]

    def samples(self) -> list[tuple[Path, Path | None]]:
        labels = self.label_dirs()[0]
        pairs = []
        for image in glob_sorted(self.image_dirs()[0], "*.png"):
            stem = f"ss_{image.stem[len('rgb_') :]}" if image.stem.startswith("rgb_") else image.stem
            pairs.append((image, labels / f"{stem}.png"))
        return pairs

    def label_mapper(self) -> LabelMapper:
        return LabelMapper(identity_label_map(len(CITYSCAPES_CLASSES), (URBANSYN_UNLABELED, IGNORE_INDEX)))
