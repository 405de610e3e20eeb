"""``run --dry-run`` / `gkd.Pipeline.plan`: each training phase's cost, weights checked against their architecture
on the meta device, warnings, and ``sweep --dry-run``."""

import timm
import torch
from safetensors.torch import save_file

from gkd.cli import main
from gkd.cost import DeviceRate, phase_costs
from gkd.pipeline import Pipeline
from gkd.preflight import TrainingUse
from gkd.recipe import load_recipe
from gkd.stages.head import STAGE as head_stage
from tests.helpers.paths import TINY_RECIPE, TINY_SWEEP

TINY_STUDENT = {"img_size": 112, "embed_dim": 32, "depth": 4, "num_heads": 2}


def _student_weights(path, **kwargs) -> str:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **kwargs)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return str(path)


def test_plan_lists_every_phase_with_steps_images_time_and_memory(tmp_path):
    plan = Pipeline(TINY_RECIPE, tmp_path / "run", device="cpu").plan(tflops=0.05)
    recipe = load_recipe(TINY_RECIPE)
    phases = [(cost.stage, cost.phase) for cost in plan.costs]
    assert phases == [
        ("train-teacher", "teacher"),
        ("distill", "distill_task_agnostic"),
        ("distill", "distill_domain_agnostic"),
        ("train-head", "head"),
        ("train-no-kd", "no_kd"),
    ]
    head = next(cost for cost in plan.costs if cost.phase == "head")
    assert (head.steps, head.batch_size, head.images) == (recipe.head.steps, 8, recipe.head.steps * 8)
    assert all(cost.tflop_per_step > 0 and cost.peak_gib_per_rank > 0 for cost in plan.costs)
    # the stated rate times every phase: FLOPs of a step x steps / rate
    assert abs(head.seconds - head.tflop_per_step * head.steps / 0.05) < 1e-9
    assert abs(plan.seconds - sum(cost.seconds for cost in plan.costs)) < 1e-9
    text = str(plan)
    assert "stated rate of 0.05 TFLOP/s" in text and "total: ~" in text and "GiB a rank" in text


def test_costs_count_a_trained_part_three_times_and_split_over_ranks():
    recipe = load_recipe(TINY_RECIPE)
    rate = DeviceRate("stated", "", 1.0)
    no_kd = ("train-no-kd", TrainingUse("no_kd", recipe.compare.no_kd, "source"))
    [no_kd_one] = phase_costs(recipe, [no_kd], 5, rate, ranks=1)
    [no_kd_two] = phase_costs(recipe, [no_kd], 5, rate, ranks=2)
    [head] = phase_costs(recipe, [("train-head", head_stage.trainings(recipe)[0])], 5, rate, ranks=1)
    assert abs(no_kd_two.seconds - no_kd_one.seconds / 2) < 1e-12  # the same global batch over two ranks
    assert head.tflop_per_step < no_kd_one.tflop_per_step  # a frozen encoder runs forward only
    assert head.peak_gib_per_rank < no_kd_one.peak_gib_per_rank  # no gradients or moments for it


def test_qad_costs_the_frozen_teacher_only_when_it_distils():
    from gkd.stages.export import STAGE as export_stage

    recipe = load_recipe(TINY_RECIPE)
    rate = DeviceRate("stated", "", 1.0)
    costs = []
    for weight in (0.0, 1.0):
        int8 = recipe.export.int8.model_copy(update={"method": "qad", "distill_weight": weight})
        tuned = recipe.model_copy(update={"export": recipe.export.model_copy(update={"int8": int8})})
        [use] = export_stage.trainings(tuned)
        assert use.trained == ("student",) and use.frozen == (("teacher encoder",) if weight else ())
        costs += phase_costs(tuned, [("export", use)], 5, rate, ranks=1)
    assert costs[1].tflop_per_step > costs[0].tflop_per_step  # the teacher's forward pass on top


def test_dry_run_fails_on_a_checkpoint_of_another_architecture_naming_keys(tmp_path, capsys):
    wrong = _student_weights(tmp_path / "wide.safetensors", **{**TINY_STUDENT, "embed_dim": 48})
    right = _student_weights(tmp_path / "right.safetensors", **TINY_STUDENT)
    options = ["--dry-run", "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(["run", str(TINY_RECIPE), f"models.student.weights={wrong}", *options]) == 2
    out = capsys.readouterr().out
    assert "models.student.weights:" in out and "mis-shaped: " in out
    assert "blocks.0.norm2.bias (file (48,), model (32,))" in out
    assert main(["run", str(TINY_RECIPE), f"models.student.weights={right}", *options]) == 0
    assert "everything the recipe names is present and readable" in capsys.readouterr().out


def test_random_student_under_a_pretrained_teacher_is_a_warning(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=112, embed_dim=48, depth=4, num_heads=2
    )
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(teacher))
    plan = Pipeline(TINY_RECIPE, tmp_path / "run", overrides=[f"models.teacher.weights={teacher}"]).plan(tflops=1)
    assert plan.ok and len(plan.warnings) == 1 and "models.student.weights" in plan.warnings[0]
    assert "warnings:" in str(plan)


def test_plan_of_chosen_stages_runs_and_costs_only_those(tmp_path):
    plan = Pipeline(TINY_RECIPE, tmp_path / "run", device="cpu").plan(tflops=1, stages=["distill", "export"])
    assert plan.to_run == ["distill", "export"]
    assert {cost.stage for cost in plan.costs} == {"distill"}
    assert "train-teacher      not among the stages asked for" in str(plan)


def test_sweep_dry_run_plans_the_shared_teacher_once_and_each_student_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(TINY_SWEEP), "--students", "deit_tiny", "deit_small", "--dry-run", "--out", str(out)]
    assert main([*argv, "--tflops", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.count("training cost (estimate:") == 3 and "student: deit_small" in text
    assert text.count("train-teacher / teacher:") == 1  # one teacher for every student, costed once
    assert text.count("train-head / head:") == 2 and "train-no-kd /" not in text
    assert not out.exists()
    assert torch.get_num_threads() >= 1


def test_own_data_template_plans_the_hour_the_readme_says(tmp_path):
    from tests.helpers.paths import RECIPES_DIR

    plan = Pipeline(RECIPES_DIR / "own_data.yaml", tmp_path / "run", device="cpu").plan(tflops=127)
    assert not plan.ok and "weights/dinov2_vitb14_pretrain.pth" in plan.missing  # nothing of it is here
    steps = {cost.phase: (cost.steps, cost.batch_size) for cost in plan.costs}
    assert steps == {"distill_task_agnostic": (10000, 256), "distill_domain_agnostic": (12000, 32), "head": (10000, 16)}
    assert 50 * 60 < plan.seconds < 60 * 60 and 30 < plan.peak_gib_per_rank < 40  # README "Your own data", step 3
