"""The datasets of GKD's multi-source setting (SYNTHIA, UrbanSyn) in their on-disk layouts, their
concatenation with GTAV-like sources in a run, and Mapillary scored at half resolution as the GKD code does."""

import numpy as np
import pytest
import torch

from gkd.data.base import IGNORE_INDEX, DataError
from gkd.data.config import DatasetConfig, build_dataset
from gkd.data.mapillary import MAPILLARY_TO_CITYSCAPES
from gkd.recipe import RecipeError, load_recipe, merge, parse_recipe
from gkd.stages.context import Run
from gkd.utils.runtime import DistInfo
from tests.helpers.data_layouts import image, save_ids, save_rgb
from tests.helpers.paths import TINY_RECIPE


def test_synthia_reads_the_converted_train_ids(tmp_path):
    for i in range(2):
        save_rgb(tmp_path / "RGB" / f"{i:07d}.png", image(i))
        save_ids(tmp_path / "GT" / "LABELS" / f"{i:07d}_labelTrainIds.png", np.resize([0, 10, 18, 255], (6, 8)))
    dataset = build_dataset(DatasetConfig(name="synthia", root=tmp_path, split="all"))
    assert len(dataset) == 2
    assert sorted(np.unique(dataset[1]["label"].numpy()).tolist()) == [0, 10, 18, IGNORE_INDEX]


def test_urbansyn_pairs_rgb_with_ss_and_ignores_id_19(tmp_path):
    for i in range(3):
        save_rgb(tmp_path / "rgb" / f"rgb_{i:04d}.png", image(i))
        save_ids(tmp_path / "ss" / f"ss_{i:04d}.png", np.resize([0, 5, 19], (6, 8)))
    dataset = build_dataset(DatasetConfig(name="urbansyn", root=tmp_path, split="all"))
    assert len(dataset) == 3 and dataset[0]["path"].endswith("rgb_0000.png")
    assert sorted(np.unique(dataset[2]["label"].numpy()).tolist()) == [0, 5, IGNORE_INDEX]
    save_ids(tmp_path / "ss" / "ss_0001.png", np.resize([0, 20], (6, 8)))
    with pytest.raises(DataError, match=r"ss_0001\.png: label ids \[20\]"):
        dataset.load(1)


def test_mapillary_half_resolution(tmp_path):
    road = next(raw for raw, train in MAPILLARY_TO_CITYSCAPES.items() if train == 0)
    sky = next(raw for raw, train in MAPILLARY_TO_CITYSCAPES.items() if train == 10)
    ids = np.full((12, 16), road)
    ids[:, 8:] = sky
    save_rgb(tmp_path / "validation" / "images" / "a.jpg", image(0, 12, 16))
    save_ids(tmp_path / "validation" / "labels" / "a.png", ids)
    full = build_dataset(DatasetConfig(name="mapillary", root=tmp_path, split="validation"))[0]
    half = build_dataset(
        DatasetConfig(name="mapillary", root=tmp_path, split="validation", options={"half_resolution": True})
    )[0]
    assert tuple(full["label"].shape) == (12, 16) and tuple(half["label"].shape) == (6, 8)
    assert tuple(half["image"].shape) == (3, 6, 8)
    assert (half["label"][:, :4] == 0).all() and (half["label"][:, 4:] == 10).all()


def test_extra_sources_are_trained_on_together(tmp_path):
    tiny = load_recipe(TINY_RECIPE).model_dump(mode="json")
    extra = {"name": "synthetic", "split": "train", "options": {"domain": "fog", "num_samples": 5, "size": [112, 112]}}
    recipe = parse_recipe(merge(tiny, {"data": {"extra_sources": [extra]}}))
    run = Run(recipe, tmp_path, torch.device("cpu"), DistInfo())
    assert len(run.dataset(recipe.data.source, train=True)) == 32 + 5
    assert len(run.dataset(recipe.data.source_val, train=False)) == 8  # only the training source set grows
    camvid = {"name": "camvid", "root": str(tmp_path), "split": "train"}
    with pytest.raises(RecipeError, match=r"extra_sources\.0: camvid has other classes than synthetic"):
        parse_recipe(merge(tiny, {"data": {"extra_sources": [camvid]}}))
