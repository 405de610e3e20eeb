"""The paper recipes under ``recipes/``: each validates, says in its settings what its file name says,
and ``gkd-compress run RECIPE --dry-run`` lists what a user still has to provide."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gkd.cli import main
from gkd.recipe import Recipe, load_recipe
from tests.helpers.paths import RECIPES_DIR

# the paper's recipes live in sub-folders; top-level ones (camvid_day2dusk.yaml) are this project's own
# benchmarks, tested where they are used (tests/test_compare.py)
RECIPE_FILES = sorted(p for p in RECIPES_DIR.rglob("*/*.yaml") if p.relative_to(RECIPES_DIR).parts[0] != "_base")
BENCHMARKS = ("gtav2real", "cityscapes2acdc", "potsdam2other")

PAIRS = {
    "f2l_dinov2l_deitb": ("dinov2_vitl14", "deit_base"),
    "f2l_dinov2b_deits": ("dinov2_vitb14", "deit_small"),
    "f2f_dinov2l_dinov2b": ("dinov2_vitl14", "dinov2_vitb14"),
    "f2f_dinov2b_dinov2s": ("dinov2_vitb14", "dinov2_vits14"),
    "f2f_eva02l_eva02b": ("eva02_large", "eva02_base"),
    "f2f_eva02b_eva02s": ("eva02_base", "eva02_small"),
    "f2f_dinov2l_dinob": ("dinov2_vitl14", "dino_vitb16"),  # the GKD code's F2F scripts' DINO v1 students
    "f2f_dinov2b_dinos": ("dinov2_vitb14", "dino_vits16"),
    "f2l_dinov2b_deitt": ("dinov2_vitb14", "deit_tiny"),  # ViT-Ti student
}
# Table 6 (GTAV -> ACDC) and the multi-source setting: GKD with the F2L students only
EXTRA_BENCHMARKS = ("gtav2acdc", "multisource2real")
EXTRA_PAIRS = {"f2l_dinov2l_deitb", "f2l_dinov2b_deits"}
SOURCES = {
    "gtav2acdc": ("gtav", {"night", "snow", "fog", "rain"}),
    "multisource2real": ("gtav", {"cityscapes", "bdd100k", "mapillary"}),
    "gtav2real": ("gtav", {"cityscapes", "bdd100k", "mapillary"}),
    "cityscapes2acdc": ("cityscapes", {"night", "snow", "fog", "rain"}),
    "potsdam2other": ("potsdam", {"potsdam_irrg", "vaihingen_irrg"}),
}
# file-name method -> (schedule, loss)
METHODS = {
    "gkd": ("two_stage", "qsd"),
    "vanilla_kd": ("one_stage", "vanilla_kd"),
    "cwd": ("one_stage", "cwd_logits"),
    "af_dcd": ("one_stage", "af_dcd"),
    "g2sd": ("one_stage", "g2sd"),
    "vitkd": ("one_stage", "vitkd"),
    "proteus": ("one_stage", "proteus"),
    "mse": ("one_stage", "mse"),
}
LOGIT_LOSSES = {"vanilla_kd", "cwd_logits"}
NO_TASK_AGNOSTIC = {"table5_row2_domain_agnostic.yaml"}  # the Table 5 row without 1a


def _id(path: Path) -> str:
    return path.relative_to(RECIPES_DIR).as_posix()


@pytest.fixture(scope="module")
def recipes() -> dict[Path, Recipe]:
    return {path: load_recipe(path) for path in RECIPE_FILES}


def test_the_paper_recipes_are_there():
    dirs = {path.relative_to(RECIPES_DIR).parts[0] for path in RECIPE_FILES}
    assert {*BENCHMARKS, "fractions", "ablations"} <= dirs
    for benchmark in BENCHMARKS:
        for pair in PAIRS:
            assert (RECIPES_DIR / benchmark / f"{pair}_gkd.yaml").is_file()
    for benchmark in EXTRA_BENCHMARKS:
        assert {p.stem.removesuffix("_gkd") for p in (RECIPES_DIR / benchmark).glob("*.yaml")} == EXTRA_PAIRS
    assert len(list((RECIPES_DIR / "ablations").glob("table5_*.yaml"))) == 6
    assert len(list((RECIPES_DIR / "ablations").glob("table4_*.yaml"))) == 6


def test_every_recipe_loads_validates_and_keeps_the_paper_protocol(recipes):
    """One test over every recipe file (loading validates the schema): a list of what is off, not N tests."""
    off = {}
    for path, recipe in recipes.items():
        settings = (
            recipe.name != "recipe",  # every paper recipe names itself
            recipe.data.img_size == (512, 512),
            (recipe.models.decoder.name, recipe.models.decoder.layers) == ("mask2former", (3, 5, 7, 11)),
            recipe.evaluate.mode == "slide",
        )
        if not all(settings):
            off[_id(path)] = settings
    assert len(recipes) == len(RECIPE_FILES) > 150 and off == {}


def test_names_are_unique(recipes):
    by_name: dict[str, list[str]] = {}
    for path, recipe in recipes.items():
        by_name.setdefault(recipe.name, []).append(_id(path))
    assert {name: files for name, files in by_name.items() if len(files) > 1} == {}


def test_schedules_are_complete(recipes):
    for path, recipe in recipes.items():
        distill = recipe.distill
        if distill.schedule == "two_stage":
            assert distill.domain_agnostic is not None, _id(path)
            assert recipe.head is not None, _id(path)
            if path.name in NO_TASK_AGNOSTIC:
                assert distill.task_agnostic is None and recipe.data.proxy is None, _id(path)
            else:
                assert distill.task_agnostic is not None, f"{_id(path)}: two-stage recipes run 1a and 1b"
                assert recipe.data.proxy is not None and recipe.data.proxy.name == "image_folder", _id(path)
        else:
            assert distill.joint is not None and recipe.head is None, _id(path)
            assert distill.task_agnostic is None and distill.domain_agnostic is None, _id(path)
            assert recipe.data.proxy is None, f"{_id(path)}: one-stage recipes need no proxy set"
        needs_teacher_head = distill.loss.name in LOGIT_LOSSES
        assert (recipe.teacher_training is not None) == needs_teacher_head, _id(path)


def test_benchmark_and_method_recipes_match_their_file_names(recipes):
    for path, recipe in recipes.items():
        parts = path.relative_to(RECIPES_DIR).parts
        if parts[0] not in (*BENCHMARKS, *EXTRA_BENCHMARKS):
            continue
        benchmark = parts[0]
        pair = next(p for p in PAIRS if path.stem.startswith(p + "_"))
        method = path.stem.removeprefix(pair + "_")
        assert recipe.name == f"{benchmark}_{pair}_{method}"
        assert (recipe.models.teacher.name, recipe.models.student.name) == PAIRS[pair], _id(path)
        assert recipe.models.teacher.weights is not None and recipe.models.student.weights is not None
        source, targets = SOURCES[benchmark]
        assert recipe.data.source.name == source and set(recipe.data.targets) == targets, _id(path)
        extra = [config.name for config in recipe.data.extra_sources]
        assert extra == (["synthia", "urbansyn"] if benchmark == "multisource2real" else []), _id(path)
        assert recipe.data.source.fraction == "full"
        assert (recipe.distill.schedule, recipe.distill.loss.name) == METHODS[method], _id(path)


def test_fraction_recipes_differ_from_their_full_recipe_only_in_the_fraction(recipes):
    fraction_files = [p for p in recipes if p.relative_to(RECIPES_DIR).parts[0] == "fractions"]
    assert len(fraction_files) == 2 * 4 * 2 * 3  # benchmarks x pairs x (GKD, Af-DCD) x (1/16, 1/8, 1/4)
    for path in fraction_files:
        benchmark = path.parent.name
        stem, tag = re.fullmatch(r"(.+)_(1-16|1-8|1-4)", path.stem).groups()
        full = recipes[RECIPES_DIR / benchmark / f"{stem}.yaml"]
        recipe = recipes[path]
        assert recipe.data.source.fraction == tag.replace("-", "/"), _id(path)
        changed = recipe.model_copy(
            update={"name": full.name, "data": recipe.data.model_copy(update={"source": full.data.source})}
        )
        assert changed == full, _id(path)


def test_table4_rows_are_what_their_file_names_say(recipes):
    for path in sorted((RECIPES_DIR / "ablations").glob("table4_*.yaml")):
        stages, loss = re.fullmatch(r"table4_(one|two)_stage_(\w+)", path.stem).groups()
        recipe = recipes[path]
        assert recipe.distill.schedule == f"{stages}_stage", _id(path)
        assert recipe.distill.loss.name == loss, _id(path)
        assert (recipe.models.teacher.name, recipe.models.student.name) == PAIRS["f2l_dinov2b_deits"]
        assert recipe.data.source.name == "gtav"


@pytest.mark.parametrize(
    ("stem", "schedule", "task_agnostic", "loss", "switches"),
    [
        ("table5_row1_one_stage", "one_stage", False, "mse", None),
        ("table5_row2_domain_agnostic", "two_stage", False, "mse", None),
        ("table5_row3_task_domain_agnostic", "two_stage", True, "mse", None),
        ("table5_row4_qsd_cls", "two_stage", True, "qsd", (True, False, False)),
        ("table5_row5_qsd_cls_feature", "two_stage", True, "qsd", (True, True, False)),
        ("table5_row6_qsd_cls_feature_mask", "two_stage", True, "qsd", (True, True, True)),
    ],
)
def test_table5_rows_switch_what_their_file_names_say(recipes, stem, schedule, task_agnostic, loss, switches):
    recipe = recipes[RECIPES_DIR / "ablations" / f"{stem}.yaml"]
    assert recipe.distill.schedule == schedule
    assert (recipe.distill.task_agnostic is not None) == task_agnostic
    assert recipe.distill.loss.name == loss
    if switches is not None:
        options = recipe.distill.loss.options
        assert (options["cls_token"], options["feature"], options["mask_patch"]) == switches
        # the names say it too
        assert switches == ("cls" in stem, "feature" in stem, "mask" in stem)
    assert (recipe.models.teacher.name, recipe.models.student.name) == PAIRS["f2l_dinov2b_deits"]
    assert recipe.data.source.name == "gtav"


def test_full_gkd_ablation_rows_equal_the_gkd_recipe(recipes):
    gkd = recipes[RECIPES_DIR / "gtav2real" / "f2l_dinov2b_deits_gkd.yaml"]
    for stem in ("table5_row6_qsd_cls_feature_mask", "table4_two_stage_qsd"):
        recipe = recipes[RECIPES_DIR / "ablations" / f"{stem}.yaml"]
        assert recipe.model_copy(update={"name": gkd.name}) == gkd, stem


def test_dry_run_lists_missing_weights_and_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative data/ and weights/ paths resolve against the working directory
    monkeypatch.delenv("GKD_WEIGHTS_DIR", raising=False)
    recipe = RECIPES_DIR / "gtav2real" / "f2l_dinov2b_deits_gkd.yaml"
    code = main(["run", str(recipe), "--dry-run", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 2
    missing = out.split("missing:", 1)[1].split()
    for path in (
        "weights/dinov2_vitb14_pretrain.pth",
        "weights/deit_small_patch16_224-cd65a155.pth",
        "data/gtav",
        "data/imagenet",
        "data/cityscapes",
        "data/bdd100k",
        "data/mapillary",
    ):
        assert path in missing, f"{path} not listed as missing:\n{out}"
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_recipes_follow_the_authors_protocol(recipes):
    """Every paper backbone at patch 16 (the GKD code's conversion), GKD's 1a at patch 14 on timm-augmented
    224 crops, 1b on timm-augmented 512 crops, both with repeated augmentation, poly 0.9, validation every 4k,
    Mapillary scored at half resolution."""
    for path, recipe in recipes.items():
        models = recipe.models
        assert models.teacher.patch_size == models.student.patch_size == 16, _id(path)
        trained = [config for config in (recipe.head, recipe.distill.joint, recipe.teacher_training) if config]
        assert all(config.schedule == "poly" and config.poly_power == 0.9 for config in trained), _id(path)
        if "mapillary" in recipe.data.targets:
            assert recipe.data.targets["mapillary"].options["half_resolution"], _id(path)
        if recipe.distill.schedule != "two_stage":
            continue
        assert recipe.head.validate_every == 4000, _id(path)
        assert recipe.data.distill_transform is not None and recipe.data.distill_transform.input_size == 512
        assert recipe.distill.domain_agnostic.repeated_augmentation == 3, _id(path)
        if recipe.distill.task_agnostic is not None:
            assert recipe.distill.task_agnostic_patch_size == 14, _id(path)
            assert recipe.data.proxy_transform is not None and recipe.data.proxy_transform.input_size == 224
            assert recipe.data.proxy_transform.auto_augment == "rand-m9-mstd0.5-inc1"
            assert recipe.data.proxy_transform.re_prob == 0.25
            assert recipe.distill.task_agnostic.repeated_augmentation == 3, _id(path)


@pytest.mark.parametrize(
    "name", ["gtav2acdc/f2l_dinov2b_deits_gkd.yaml", "multisource2real/f2l_dinov2l_deitb_gkd.yaml"]
)
def test_new_benchmark_recipes_name_every_path_in_dry_run(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GKD_WEIGHTS_DIR", raising=False)
    recipe = RECIPES_DIR / name
    assert main(["run", str(recipe), "--dry-run", "--out", str(tmp_path / "run")]) == 2
    missing = capsys.readouterr().out.split("missing:", 1)[1].split()
    for path in missing:  # what a user would provide: weight files and dataset folders
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch() if path.startswith("weights/") else (tmp_path / path).mkdir(exist_ok=True)
    assert main(["run", str(recipe), "--dry-run", "--out", str(tmp_path / "run")]) == 2  # now the split folders
    missing = capsys.readouterr().out.split("missing:", 1)[1].split()
    for path in missing:
        (tmp_path / path).mkdir(parents=True, exist_ok=True)
    # every path the recipe names now exists; the pre-flight check reports the empty folders and weight files
    assert main(["run", str(recipe), "--dry-run", "--out", str(tmp_path / "run")]) == 2
    out = capsys.readouterr().out
    assert "missing:" not in out
    problems = out.split("problems:", 1)[1].strip().splitlines()
    assert any("is empty" in problem for problem in problems), problems
    assert all("samples in split" in problem or "is empty" in problem for problem in problems), problems
