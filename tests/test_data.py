"""Dataset registry and config, label fractions, benchmarks, transforms."""

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from gkd.data import base
from gkd.data.base import IGNORE_INDEX, DataError, LabelMapper
from gkd.data.config import DATASET_NAMES, DatasetConfig, build_dataset, dataset_info, describe_dataset
from gkd.data.fractions import fraction_indices
from gkd.data.transforms import (
    EvalTransformConfig,
    TrainTransformConfig,
    build_eval_transform,
    build_train_transform,
)
from tests.helpers.benchmarks import BENCHMARKS
from tests.helpers.data_layouts import cityscapes


# -- registry and config ---------------------------------------------------------------------------------
def test_registry_names_and_class_counts():
    counts = {name: dataset_info(name)[0] for name in DATASET_NAMES}
    assert counts == {
        "gtav": 19, "synthia": 19, "urbansyn": 19, "cityscapes": 19, "bdd100k": 19, "mapillary": 19, "acdc": 19,
        "potsdam": 6, "vaihingen": 6, "camvid": 11, "folder": 0, "image_folder": 0, "synthetic": 6,
    }  # fmt: skip
    num_classes, names, palette = dataset_info("cityscapes")
    assert names[0] == "road" and names[-1] == "bicycle" and palette[0] == (128, 64, 128)
    assert dataset_info("potsdam")[1] == (
        "impervious surfaces", "building", "low vegetation", "tree", "car", "clutter",
    )  # fmt: skip
    for name in DATASET_NAMES:
        num_classes, names, palette = dataset_info(name)
        assert len(names) == len(palette) == num_classes
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        dataset_info("kitti")


def test_config_validates_name_options_and_fraction():
    with pytest.raises(ValidationError, match="unknown dataset 'citiscapes'"):
        DatasetConfig(name="citiscapes")
    with pytest.raises(ValidationError, match="domian"):
        DatasetConfig(name="camvid", options={"domian": "dusk"})
    with pytest.raises(ValidationError, match="condition"):
        DatasetConfig(name="acdc", options={"condition": "sandstorm"})
    with pytest.raises(ValidationError, match="fraction"):
        DatasetConfig(name="gtav", fraction="1/3")
    with pytest.raises(ValidationError, match=r"not in \(0, 1\]"):
        DatasetConfig(name="gtav", fraction=1.5)
    with pytest.raises(ValidationError, match="limit"):
        DatasetConfig(name="gtav", limit=0)
    config = DatasetConfig(name="potsdam", root="/data/potsdam", options={"modality": "irrg"})
    assert config.options == {"layout": "auto", "eroded": True, "modality": "irrg"}  # completed with defaults
    assert DatasetConfig.model_validate(config.model_dump(mode="json")) == config


def test_synthetic_is_registered_lazily_and_takes_fractions():
    config = DatasetConfig(name="synthetic", split="val", options={"num_samples": 16, "size": [32, 48]}, limit=3)
    dataset = build_dataset(config)
    assert len(dataset) == 3 and dataset[0]["label"].shape == (32, 48)
    assert build_dataset(config, labeled=False)[0].keys() == {"image", "path"}
    assert describe_dataset(config)["missing"] == []


def test_describe_reads_no_image_and_lists_missing_folders(tmp_path, monkeypatch):
    root = cityscapes(tmp_path / "cs", "val")

    def no_reading(path):
        raise AssertionError(f"describe read {path}")

    monkeypatch.setattr(base, "open_image", no_reading)
    present = describe_dataset(DatasetConfig(name="cityscapes", root=root, split="val"))
    assert present["missing"] == [] and present["paths"]["images"] == [str(root / "leftImg8bit" / "val")]
    absent = describe_dataset(DatasetConfig(name="cityscapes", root=root, split="test"))
    assert absent["missing"] == [str(root / "leftImg8bit" / "test"), str(root / "gtFine" / "test")]
    assert describe_dataset(DatasetConfig(name="gtav", root=tmp_path / "no_gtav"))["missing"][0].endswith("no_gtav")
    assert describe_dataset(DatasetConfig(name="gtav"))["missing"] == ["gtav: no root given"]
    json.dumps(absent)


def test_label_mapper_rejects_ids_outside_its_table():
    mapper = LabelMapper({0: 1, 1: IGNORE_INDEX})
    np.testing.assert_array_equal(mapper(np.array([[0, 1]]), "x.png"), [[1, IGNORE_INDEX]])
    with pytest.raises(DataError, match=r"x\.png: label ids \[2\]"):
        mapper(np.array([[0, 2]]), "x.png")
    with pytest.raises(DataError, match=r"x\.png: label ids \[-1, 300\] outside"):
        mapper(np.array([[-1, 300]]), "x.png")


# -- label fractions ---------------------------------------------------------------------------------------
def test_fraction_sizes_follow_the_semi_supervised_protocol():
    sizes = {name: len(fraction_indices(2975, name, 0)) for name in ("1/16", "1/8", "1/4", "full")}
    assert sizes == {"1/16": 186, "1/8": 372, "1/4": 744, "full": 2975}
    assert len(fraction_indices(10, "1/16", 0)) == 1
    assert len(fraction_indices(30, 0.1, 0)) == 3
    assert fraction_indices(5, "full", 3) == [0, 1, 2, 3, 4]


def test_fractions_are_seeded_nested_and_sorted():
    eighth = fraction_indices(1000, "1/8", seed=7)
    assert eighth == fraction_indices(1000, "1/8", seed=7) == sorted(eighth)
    assert eighth != fraction_indices(1000, "1/8", seed=8)
    sixteenth, quarter = fraction_indices(1000, "1/16", 7), fraction_indices(1000, "1/4", 7)
    assert set(sixteenth) < set(eighth) < set(quarter)
    assert len(set(quarter)) == 250 and all(0 <= i < 1000 for i in quarter)


def test_built_dataset_exposes_and_saves_its_fraction(tmp_path):
    root = cityscapes(tmp_path / "cs", "train", frames=20)
    config = DatasetConfig(name="cityscapes", root=root, fraction="1/4", fraction_seed=3, limit=4)
    dataset = build_dataset(config)
    assert dataset.fraction_indices == fraction_indices(20, "1/4", 3)
    assert dataset.indices == dataset.fraction_indices[:4] and len(dataset) == 4
    assert dataset[1]["path"].endswith(dataset.names[dataset.indices[1]])
    dataset.save_fraction_indices(tmp_path / "run" / "fraction.json")
    saved = json.loads((tmp_path / "run" / "fraction.json").read_text())
    assert saved["fraction"] == "1/4" and saved["fraction_seed"] == 3 and saved["num_total"] == 20
    assert saved["fraction_indices"] == dataset.fraction_indices
    assert saved["fraction_names"][0] == dataset.names[dataset.fraction_indices[0]]


# -- benchmarks --------------------------------------------------------------------------------------------
def test_benchmarks_resolve_roots_to_configs():
    assert set(BENCHMARKS) == {"gtav2real", "cityscapes2acdc", "potsdam2other", "camvid_day2dusk"}
    roots = {"gtav": "/d/gtav", "cityscapes": "/d/cs", "bdd100k": "/d/bdd", "mapillary": "/d/map"}
    real = BENCHMARKS["gtav2real"].configs(roots, fraction="1/8", fraction_seed=2)
    assert (real.source.name, real.source.split, real.source.fraction) == ("gtav", "all", "1/8")
    assert real.source_val.fraction == "full"
    assert {name: (c.name, str(c.root), c.split) for name, c in real.targets.items()} == {
        "cityscapes": ("cityscapes", "/d/cs", "val"),
        "bdd100k": ("bdd100k", "/d/bdd", "val"),
        "mapillary": ("mapillary", "/d/map", "validation"),
    }
    acdc = BENCHMARKS["cityscapes2acdc"].configs({"cityscapes": "/d/cs", "acdc": "/d/acdc"})
    assert {name: c.options["condition"] for name, c in acdc.targets.items()} == {
        "night": "night", "snow": "snow", "fog": "fog", "rain": "rain",
    }  # fmt: skip
    aerial = BENCHMARKS["potsdam2other"].configs({"potsdam": "/d/p", "vaihingen": "/d/v"})
    assert aerial.source.options["modality"] == "rgb" and str(aerial.targets["potsdam_irrg"].root) == "/d/p"
    converted = BENCHMARKS["potsdam2other"].configs({"potsdam": "/d/p", "potsdam_irrg": "/d/pi", "vaihingen": "/d/v"})
    assert str(converted.targets["potsdam_irrg"].root) == "/d/pi"
    with pytest.raises(DataError, match="no root for vaihingen"):
        BENCHMARKS["potsdam2other"].configs({"potsdam": "/d/p"})


# -- transforms --------------------------------------------------------------------------------------------
def encoded_sample(height: int, width: int) -> dict:
    """Labels 0..9 with the image's red channel encoding each pixel's label (checks joint geometry)."""
    label = torch.randint(0, 10, (height, width))
    image = torch.stack([label.float() / 255, torch.rand(height, width), torch.rand(height, width)])
    return {"image": image, "label": label, "path": "x"}


def test_train_transform_keeps_image_and_label_aligned_and_pads_with_ignore():
    torch.manual_seed(0)
    transform = build_train_transform(
        TrainTransformConfig(scale_range=(1.0, 1.0), crop_size=(8, 12), hflip=True, photometric=False)
    )
    for _ in range(10):
        out = transform(encoded_sample(6, 20))
        assert out["image"].shape == (3, 8, 12) and out["label"].shape == (8, 12)
        labeled = out["label"] != IGNORE_INDEX
        assert not labeled[6:].any() and labeled[:6].all()  # crop height 8 > image height 6: padded rows ignored
        assert torch.equal(out["label"][labeled], (out["image"][0][labeled] * 255).round().long())
        assert (out["image"][:, 6:] == 0).all()


def test_random_resize_follows_mmseg_keep_ratio():
    sample = encoded_sample(10, 20)
    kept = TrainTransformConfig(base_size=(5, 20), scale_range=(1, 1), crop_size=(50, 50), photometric=False)
    out = build_train_transform(kept.model_copy(update={"hflip": False}))(sample)
    assert (out["label"] != IGNORE_INDEX).sum() == 5 * 10  # fitted in the 5x20 box: 0.5 x (10, 20)
    stretched = kept.model_copy(update={"keep_ratio": False, "hflip": False})
    assert (build_train_transform(stretched)(sample)["label"] != IGNORE_INDEX).sum() == 5 * 20
    with pytest.raises(ValidationError, match="scale_range"):
        TrainTransformConfig(scale_range=(2.0, 1.0))


def test_cat_max_ratio_prefers_crops_with_several_classes():
    label = torch.zeros(100, 100, dtype=torch.long)
    label[:, 50:] = 1
    sample = {"image": torch.rand(3, 100, 100), "label": label, "path": "x"}

    def mixed_share(ratio: float) -> float:
        torch.manual_seed(0)
        config = TrainTransformConfig(scale_range=(1, 1), crop_size=(20, 20), cat_max_ratio=ratio, photometric=False)
        transform = build_train_transform(config)
        crops = [transform(sample)["label"].float().mean().item() for _ in range(60)]
        return float(np.mean([0.25 < share < 0.75 for share in crops]))

    assert mixed_share(1.0) < 0.3 < 0.6 < mixed_share(0.75)


def test_eval_transform_resizes_short_side_and_keeps_native_labels():
    sample = encoded_sample(10, 30)
    out = build_eval_transform(EvalTransformConfig(short_side=5))(sample)
    assert out["image"].shape == (3, 5, 15) and torch.equal(out["label"], sample["label"])
    both = build_eval_transform(EvalTransformConfig(size=(4, 6), resize_label=True))(sample)
    assert both["image"].shape == (3, 4, 6) and both["label"].shape == (4, 6)
    assert set(both["label"].unique().tolist()) <= set(sample["label"].unique().tolist())  # nearest, no new ids
    assert build_eval_transform(EvalTransformConfig()) is None
    with pytest.raises(ValidationError, match="not both"):
        EvalTransformConfig(size=(4, 6), short_side=5)
