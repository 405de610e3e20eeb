"""CamVid (Brostow et al. 2009) in the SegNet tutorial layout, with a day / dusk domain split.

Layout: ``{split}/*.png`` with ``{split}annot/*.png`` (ids 0..10, 11 = unlabelled -> ignore), and the
split files ``{split}.txt`` listing ``/SegNet/CamVid/{split}/X.png /SegNet/CamVid/{split}annot/X.png``
(the prefix is stripped; when a split file is absent, the folders are listed instead).
Sequences are the file-name prefix: ``0001TP`` was filmed at dusk (62 train + 62 test frames, none in
val), ``0006R0``, ``0016E5`` and ``Seq05VD`` by day. Palette: the SegNet tutorial's class colours.
A split may join several with ``+`` (``train+test``: every dusk frame with ``domain: dusk``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gkd.data.base import DataError, LabelMapper, identity_label_map
from gkd.data.layouts import Layout, glob_sorted

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
CAMVID_VOID = 11
CAMVID_DOMAINS = {"day": ("0006R0", "0016E5", "Seq05VD"), "dusk": ("0001TP",)}
SEGNET_PREFIX = "/SegNet/CamVid/"


class CamVidOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain: Literal["all", "day", "dusk"] = Field("all", description="keep the sequences of one lighting domain")
    sequences: list[str] | None = Field(None, description="keep exactly these sequences (overrides domain)")


def sequence_of(path: Path) -> str:
    """The CamVid sequence of a frame: its file-name prefix (``0001TP_006690.png`` -> ``0001TP``)."""
    return path.name.split("_")[0]


class CamVid(Layout):
    """CamVid, 11 classes; ``options`` select a domain or sequences (see the module docstring)."""

    name = "camvid"
    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    Options = CamVidOptions

    def parts(self) -> list[str]:
        """The splits joined by ``+`` in the split name (``train+test`` -> ``["train", "test"]``)."""
        parts = self.split.split("+")
        if not all(parts):
            raise DataError(f"camvid split {self.split!r}: empty part (write e.g. 'train+test')")
        return parts

    def image_dirs(self) -> list[Path]:
        return [self.root / part for part in self.parts()]

    def label_dirs(self) -> list[Path]:
        return [self.root / f"{part}annot" for part in self.parts()]

    def split_file(self, part: str) -> Path:
        return self.root / f"{part}.txt"

    def extra_paths(self) -> dict[str, Path]:
        return {f"split_file_{part}": self.split_file(part) for part in self.parts()}

    def kept_sequences(self) -> set[str] | None:
        """The sequences to keep, or ``None`` for all."""
        if self.options.sequences is not None:
            return set(self.options.sequences)
        return None if self.options.domain == "all" else set(CAMVID_DOMAINS[self.options.domain])

    def _local(self, listed: str) -> Path:
        return self.root / listed[len(SEGNET_PREFIX) :] if listed.startswith(SEGNET_PREFIX) else self.root / listed

    def _listed_pairs(self, split_file: Path) -> list[tuple[Path, Path | None]]:
        pairs = []
        for number, line in enumerate(split_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise DataError(f"{split_file}:{number}: expected 'image label', got {line!r}")
            pairs.append((self._local(fields[0]), self._local(fields[1])))
        return pairs

    def _part_pairs(self, part: str) -> list[tuple[Path, Path | None]]:
        if self.split_file(part).is_file():
            return self._listed_pairs(self.split_file(part))
        labels = self.root / f"{part}annot"
        return [(image, labels / image.name) for image in glob_sorted(self.root / part, "*.png")]

    def samples(self) -> list[tuple[Path, Path | None]]:
        pairs = sorted(pair for part in self.parts() for pair in self._part_pairs(part))
        keep = self.kept_sequences()
        return [pair for pair in pairs if keep is None or sequence_of(pair[0]) in keep]

    def label_mapper(self) -> LabelMapper:
        return LabelMapper(identity_label_map(len(CAMVID_CLASSES), (CAMVID_VOID,)))
