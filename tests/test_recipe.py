import copy

import pytest
import yaml

from gkd.cli import main
from gkd.recipe import RecipeError, dump_recipe, load_recipe, merge, parse_recipe


@pytest.fixture(scope="module")
def default_data() -> dict:
    return load_recipe().model_dump(mode="json")


def _with(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def test_embedded_default_validates_and_round_trips(default_data):
    recipe = load_recipe()
    assert recipe.name == "default"
    assert set(recipe.data.targets) == {"dusk", "fog"}
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("distill.task_agnostic.stepz", 3, r"distill\.task_agnostic\.stepz: Extra inputs are not permitted"),
        ("distill.task_agnostic.steps", -1, r"distill\.task_agnostic\.steps: Input should be greater than 0"),
        ("models.decoder.name", "segformer", r"models\.decoder\.name: Input should be 'uper', 'linear' or 'mask2f"),
        ("training.precision", "fp8", r"training\.precision"),
        ("distill.loss.options", {"temprature": 2.0}, r"distill\.loss.*temprature"),
        ("distill.loss.name", "kd_of_my_dreams", r"distill\.loss.*kd_of_my_dreams"),
        ("data.targets", {}, r"data: .*at least one target domain"),
    ],
)
def test_bad_keys_and_values_are_named(default_data, dotted, value, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_with(default_data, dotted, value))


def test_schedule_consistency_is_checked(default_data):
    logit_two_stage = _with(default_data, "distill.loss", {"name": "vanilla_kd", "options": {}})
    with pytest.raises(RecipeError, match="vanilla_kd takes logits; it needs schedule one_stage"):
        parse_recipe(logit_two_stage)
    logit_one_stage = _with(logit_two_stage, "distill.schedule", "one_stage")
    logit_one_stage = _with(logit_one_stage, "distill.joint", {"steps": 10})
    assert parse_recipe(_with(logit_one_stage, "teacher_training", {"steps": 10})).distill.schedule == "one_stage"
    with pytest.raises(RecipeError, match="teacher_training: vanilla_kd needs a teacher with a trained head"):
        parse_recipe(_with(logit_one_stage, "teacher_training", None))
    no_proxy = _with(default_data, "data.proxy", None)
    with pytest.raises(RecipeError, match=r"data\.proxy"):
        parse_recipe(no_proxy)


def test_cli_reports_a_bad_recipe_and_exits_2(tmp_path, capsys, default_data):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(default_data, "head.lr", "fast")))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "head.lr" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "absent.yaml"), "--dry-run"]) == 2
    assert "not found" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_names_missing_files(tmp_path, capsys, default_data):
    assert main(["run", "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    for expected in ("train-teacher", "distill", "train-head", "evaluate", "export", "benchmark", "report", "to run"):
        assert expected in out
    assert not (tmp_path / "run").exists()  # nothing written, nothing loaded

    recipe = _with(default_data, "models.teacher.weights", str(tmp_path / "dinov2_vitl14.pth"))
    recipe = _with(recipe, "models.teacher.train_encoder", False)
    recipe = _with(recipe, "data.teacher_source", None)  # a teacher with VFM weights is not trained here
    recipe = _with(
        recipe, "data.source", {"name": "cityscapes", "root": str(tmp_path / "cityscapes"), "split": "train"}
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "run2")]) == 2
    out = capsys.readouterr().out
    assert "dinov2_vitl14.pth MISSING" in out
    assert str(tmp_path / "cityscapes") in out


def test_evaluate_validate_every_written_before_it_moved_is_read_as_head_validate_every(default_data, caplog):
    """Recipes and run directories from before validation became per stage still load."""
    old = _with(default_data, "evaluate.validate_every", 7)
    del old["head"]["validate_every"]
    with caplog.at_level("WARNING", logger="gkd"):
        recipe = parse_recipe(old)
    assert recipe.head.validate_every == 7 and "now head.validate_every" in caplog.text
    assert parse_recipe(_with(default_data, "evaluate.validate_every", None)) == load_recipe()
    headless = _with(_with(default_data, "evaluate.validate_every", 7), "head", None)
    with pytest.raises(RecipeError, match="has no head"):
        parse_recipe(headless)


def test_command_line_overrides_set_typed_values_validated_by_the_schema(tmp_path):
    overrides = ["head.lr=1e-3", "distill.task_agnostic.steps=7", "seed=3", "distill.loss={name: mse}"]
    recipe = load_recipe(None, overrides)
    assert (recipe.head.lr, recipe.distill.task_agnostic.steps, recipe.seed) == (1e-3, 7, 3)
    assert recipe.distill.loss.name == "mse"
    assert load_recipe() != recipe and load_recipe(None, []) == load_recipe()
    for bad, message in [
        ("head.lrr=1", r"head\.lrr: Extra inputs are not permitted"),
        ("head.lr=fast", r"head\.lr: Input should be a valid number"),
        ("seed.x=1", r"seed is 0, not a mapping"),
        ("head.lr", r"expected dotted\.key=value"),
        ("head.lr=[1", r"not valid YAML"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, [bad])


def test_cli_overrides_reach_the_resolved_recipe_and_a_bad_one_exits_with_its_key(tmp_path, capsys):
    from gkd.pipeline import Pipeline
    from gkd.recipe import dump_recipe

    recipe = Pipeline(None, tmp_path / "run", overrides=["head.lr=0.25"]).recipe
    assert recipe.head.lr == 0.25 and yaml.safe_load(dump_recipe(recipe))["head"]["lr"] == 0.25
    assert main(["run", "--dry-run", "--out", str(tmp_path / "run"), "head.stepz=3"]) == 2
    assert "head.stepz: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["compare", "recipe_that_is_not_there.yaml", "head.lr=1"]) == 2


def test_a_section_naming_another_kind_drops_the_base_options():
    base = {"data": {"source": {"name": "synthetic", "split": "train", "options": {"num_samples": 8}}}}
    renamed = merge(base, {"data": {"source": {"name": "folder", "root": "frames"}}})
    assert renamed["data"]["source"] == {"name": "folder", "split": "train", "root": "frames"}
    kept = merge(base, {"data": {"source": {"name": "synthetic", "options": {"size": 64}}}})
    assert kept["data"]["source"]["options"] == {"num_samples": 8, "size": 64}
