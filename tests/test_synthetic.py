"""The generated scenes of the embedded default: reproducible, and the ``world`` domain as broad as it says."""

from __future__ import annotations

import numpy as np
import pytest

from gkd.data.synthetic import SyntheticOptions, SyntheticSegmentation
from gkd.recipe import RecipeError, load_recipe, parse_recipe


def _images(domain: str, count: int = 24, split: str = "train") -> np.ndarray:
    dataset = SyntheticSegmentation(SyntheticOptions(domain=domain, num_samples=count, size=(64, 64)), split=split)
    return np.stack([dataset.load(index)["image"].numpy() for index in range(count)])


def test_samples_are_a_pure_function_of_seed_split_and_index():
    options = SyntheticOptions(domain="world", num_samples=4, size=(48, 64))
    first, again = SyntheticSegmentation(options, "proxy"), SyntheticSegmentation(options, "proxy")
    assert np.array_equal(first.load(3)["image"].numpy(), again.load(3)["image"].numpy())
    assert not np.array_equal(first.load(3)["image"].numpy(), SyntheticSegmentation(options, "test").load(3)["image"])


def test_world_spans_the_looks_of_day_dusk_and_fog():
    """Each world scene has its own lighting and weather: its brightness and contrast per image vary far more
    than day's, and reach down to dusk's darkness and fog's low contrast."""
    day, dusk, fog, world = (_images(domain) for domain in ("day", "dusk", "fog", "world"))
    domains = {"day": day, "dusk": dusk, "fog": fog, "world": world}
    brightness = {name: images.mean(axis=(1, 2, 3)) for name, images in domains.items()}
    contrast = {name: images.std(axis=(1, 2, 3)) for name, images in domains.items()}
    assert brightness["world"].std() > 3 * brightness["day"].std()
    assert brightness["world"].min() <= np.median(brightness["dusk"])
    assert brightness["world"].max() >= np.median(brightness["day"])
    assert contrast["world"].min() <= np.median(contrast["fog"])


def test_world_is_labelled_for_the_teacher_and_unlabelled_as_proxy():
    options = SyntheticOptions(domain="world", num_samples=2, size=(48, 64))
    assert "label" in SyntheticSegmentation(options, "train").load(0)
    assert "label" not in SyntheticSegmentation(options, "proxy", labeled=False).load(0)


def test_teacher_source_must_share_the_source_classes():
    recipe = load_recipe(None).model_dump(mode="json")
    recipe["data"]["teacher_source"] = {"name": "synthetic", "split": "train", "options": {"domain": "world"}}
    assert parse_recipe(recipe).data.teacher_source.options["domain"] == "world"
    recipe["data"]["teacher_source"] = {"name": "camvid", "split": "train", "root": "/nowhere"}
    with pytest.raises(RecipeError, match="teacher_source"):
        parse_recipe(recipe)


def test_the_teacher_stage_trains_on_teacher_source_when_given():
    from gkd.stages.teacher import STAGE

    default = load_recipe(None)  # its teacher is trained on world scenes
    uses = STAGE.data(default)
    assert uses[0].role == "teacher source" and uses[0].config == default.data.teacher_source
    assert STAGE.trainings(default)[0].data_role == "teacher source"
    dumped = default.model_dump(mode="json")
    without = parse_recipe({**dumped, "data": {**dumped["data"], "teacher_source": None}})
    assert STAGE.data(without)[0].role == "source"
    assert STAGE.trainings(without)[0].data_role == "source"
