"""Named cross-domain benchmarks as data: a labeled source (train split and held-out split) and unseen
target domains, each resolved to ``DatasetConfig``s from a mapping ``{dataset name: root}``.

- ``gtav2real``: GTAV -> Cityscapes / BDD100K / Mapillary (val splits). The source is *all* GTAV
  frames, as DG segmentation works train (Rein, HRDA); ``source_val`` is GTAV's ``val`` split, which
  that source contains, so it measures fit, not generalisation.
- ``cityscapes2acdc``: Cityscapes -> ACDC night / snow / fog / rain (val, the labeled ACDC split).
- ``potsdam2other``: Potsdam RGB -> Potsdam IRRG / Vaihingen IRRG (val tiles). The IRRG domain reads
  root ``potsdam_irrg`` when given (an mmseg-converted IRRG copy), else ``potsdam`` (original tiles
  hold both modalities).
- ``camvid_day2dusk``: CamVid day sequences (train) -> every dusk (``0001TP``) frame, and the day test frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gkd.data.base import DataError
from gkd.data.config import DatasetConfig
from gkd.data.fractions import FractionName


class Domain(BaseModel):
    """One split of one dataset in a benchmark; ``roots`` are the keys of the root mapping to try in
    order (default: the dataset's name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    split: str
    options: dict[str, Any] = Field(default_factory=dict)
    roots: tuple[str, ...] = ()

    def config(self, roots: Mapping[str, str | Path], **settings: Any) -> DatasetConfig:
        keys = self.roots or (self.dataset,)
        root = next((roots[key] for key in keys if key in roots), None)
        if root is None:
            raise DataError(f"no root for {self.dataset}: give one of {', '.join(keys)} in the root mapping")
        return DatasetConfig(name=self.dataset, root=root, split=self.split, options=dict(self.options), **settings)


@dataclass(frozen=True)
class BenchmarkData:
    """A benchmark's configs, named like the recipe's ``data`` block."""

    source: DatasetConfig
    source_val: DatasetConfig
    targets: dict[str, DatasetConfig]


class Benchmark(BaseModel):
    """A source domain and its unseen targets; the held-out source is the source's ``source_val_split``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    source: Domain
    targets: dict[str, Domain]
    source_val_split: str = "val"

    @property
    def source_val(self) -> Domain:
        return self.source.model_copy(update={"split": self.source_val_split})

    def configs(
        self,
        roots: Mapping[str, str | Path],
        fraction: FractionName | float = "full",
        fraction_seed: int = 0,
        limit: int | None = None,
        skip_bad: bool = False,
    ) -> BenchmarkData:
        """Every domain's ``DatasetConfig``.

        Args:
            roots: ``{dataset name or root key: folder}``.
            fraction: the label fraction of the source train split.
            fraction_seed: seeds that fraction.
            limit: at most this many samples of every split.
            skip_bad: skip unreadable samples instead of stopping.
        """
        common = {"limit": limit, "skip_bad": skip_bad}
        return BenchmarkData(
            source=self.source.config(roots, fraction=fraction, fraction_seed=fraction_seed, **common),
            source_val=self.source_val.config(roots, **common),
            targets={name: domain.config(roots, **common) for name, domain in self.targets.items()},
        )


BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark(
            name="gtav2real",
            description="synthetic GTAV -> real Cityscapes, BDD100K, Mapillary (19 classes)",
            source=Domain(dataset="gtav", split="all"),
            targets={
                "cityscapes": Domain(dataset="cityscapes", split="val"),
                "bdd100k": Domain(dataset="bdd100k", split="val"),
                "mapillary": Domain(dataset="mapillary", split="validation"),
            },
        ),
        Benchmark(
            name="cityscapes2acdc",
            description="Cityscapes -> ACDC adverse conditions (19 classes)",
            source=Domain(dataset="cityscapes", split="train"),
            targets={
                condition: Domain(dataset="acdc", split="val", options={"condition": condition})
                for condition in ("night", "snow", "fog", "rain")
            },
        ),
        Benchmark(
            name="potsdam2other",
            description="Potsdam RGB -> Potsdam IRRG, Vaihingen IRRG (6 ISPRS classes)",
            source=Domain(dataset="potsdam", split="train", options={"modality": "rgb"}),
            targets={
                "potsdam_irrg": Domain(
                    dataset="potsdam", split="val", options={"modality": "irrg"}, roots=("potsdam_irrg", "potsdam")
                ),
                "vaihingen_irrg": Domain(dataset="vaihingen", split="val"),
            },
        ),
        Benchmark(
            name="camvid_day2dusk",
            description="CamVid daytime sequences -> dusk sequence 0001TP (11 classes)",
            source=Domain(dataset="camvid", split="train", options={"domain": "day"}),
            targets={
                "dusk": Domain(dataset="camvid", split="train+test", options={"domain": "dusk"}),
                "day_test": Domain(dataset="camvid", split="test", options={"domain": "day"}),
            },
        ),
    )
}
