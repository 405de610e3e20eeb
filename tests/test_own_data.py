"""A user's own 7-class data end to end (issue 36): JPEG frames and PNG masks in a folder per split, a second
labelled folder from another camera as the target, through ``data inspect``, ``run --dry-run`` and a tiny ``run``
to ``eval.json`` under its own class names."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from gkd.cli import main
from gkd.recipe import load_recipe
from tests.helpers.paths import TINY_RECIPE

pytestmark = pytest.mark.slow

CLASSES = ["road", "sidewalk", "building", "vehicle", "person", "vegetation", "sky"]
H, W = 72, 96


def _frame(index: int, tint: int) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal bands of the 7 classes (shifted per frame), each band its own colour; ``tint`` shifts colours
    the way another camera would."""
    rng = np.random.default_rng(index)
    rows = (np.arange(H) * len(CLASSES) // H + index) % len(CLASSES)
    ids = np.repeat(rows[:, None], W, axis=1).astype(np.uint8)
    colours = (np.arange(len(CLASSES))[:, None] * np.array([37, 91, 53]) + tint) % 256
    pixels = colours[ids] + rng.integers(-12, 12, (H, W, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), ids


def _write_split(root: Path, split: str, frames: int, tint: int) -> None:
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    for i in range(frames):
        pixels, ids = _frame(i, tint)
        Image.fromarray(pixels).save(root / split / "images" / f"f{i:03d}.jpg", quality=95)
        Image.fromarray(ids).save(root / split / "masks" / f"f{i:03d}.png")
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": CLASSES}))


@pytest.fixture(scope="module")
def own_recipe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("own")
    _write_split(folder / "my_frames", "train", 16, tint=0)
    _write_split(folder / "my_frames", "val", 4, tint=0)
    _write_split(folder / "other_camera", "val", 4, tint=60)
    recipe = load_recipe(TINY_RECIPE).model_dump(mode="json")  # the tiny schedule and models, written out in full
    own = str(folder / "my_frames")
    recipe["name"] = "own7"
    recipe["data"].update(
        source={"name": "folder", "root": own, "split": "train"},
        source_val={"name": "folder", "root": own, "split": "val"},
        proxy={"name": "folder", "root": own, "split": "train"},  # its images only, unlabelled
        targets={"other_camera": {"name": "folder", "root": str(folder / "other_camera"), "split": "val"}},
        teacher_source=None,  # the teacher learns these classes from the source (the generated world has others)
    )
    recipe["export"]["precisions"] = ["fp32"]
    path = folder / "own.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_own_data_inspects_plans_and_runs_under_its_class_names(own_recipe, tmp_path, capsys):
    root = own_recipe.parent / "my_frames"
    assert main(["data", "inspect", "folder", str(root), "--split", "train", "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["num_samples"] == 16 and list(inspected["class_names"]) == CLASSES
    assert all(count > 0 for count in inspected["class_pixels"])

    out = tmp_path / "run"
    assert main(["run", str(own_recipe), "--dry-run", "--out", str(out), "--device", "cpu"]) == 0
    assert "source: folder, split train" in capsys.readouterr().out

    assert main(["run", str(own_recipe), "--out", str(out), "--device", "cpu"]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["class_names"] == CLASSES
    student = evaluated["models"]["student"]["domains"]
    assert set(student) == {"source", "other_camera"} and len(student["other_camera"]["iou"]) == len(CLASSES)
