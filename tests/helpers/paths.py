"""Paths the tests share: the repository, its recipes, the tiny test recipes and the shared CamVid copy."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO / "recipes"
DEFAULT_RECIPE = REPO / "gkd" / "recipes" / "default.yaml"

TEST_DATA = REPO / "tests" / "data"
TINY_RECIPE = TEST_DATA / "tiny_recipe.yaml"
CAMVID_TINY_RECIPE = TEST_DATA / "camvid_day2dusk_tiny.yaml"
TINY_SWEEP = TEST_DATA / "tiny_sweep.yaml"
TINY_MASK2FORMER = TEST_DATA / "tiny_mask2former.yaml"

# read in place, never copied into the repository
CAMVID_ROOT = REPO.parent / "shared" / "data" / "CamVid"
IMAGENETTE_ROOT = REPO.parent / "shared" / "data" / "imagenette-5k"  # the CamVid recipe's stage-1a proxy
