"""`gkd-compress compare` on the CamVid day -> dusk recipe in miniature (tests/data/camvid_day2dusk_tiny.yaml),
and the planning and tabulation rules behind it."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gkd.cli import main
from gkd.compare import method_recipe, plan, schedule
from gkd.recipe import RecipeError, load_recipe, parse_recipe
from gkd.report.comparison import read_figure_frames, spread, summarize
from gkd.rundir import TEACHER_JOB
from tests.helpers.paths import CAMVID_ROOT, CAMVID_TINY_RECIPE, IMAGENETTE_ROOT, RECIPES_DIR, REPO

FULL = RECIPES_DIR / "camvid_day2dusk.yaml"


def _with_methods(methods: dict) -> object:
    data = load_recipe(FULL).model_dump(mode="json")
    data["compare"]["methods"] = methods
    return parse_recipe(data)


def test_the_benchmark_recipe_plans_every_row(tmp_path):
    recipe = load_recipe(FULL)
    jobs = plan(recipe, tmp_path)
    assert jobs[0].method == TEACHER_JOB
    seeds = {method: [job.seed for job in jobs if job.method == method] for method in recipe.compare.methods}
    headline = {"ceiling", "no_kd_frozen", "no_kd", "vanilla_kd", "cwd", "mse_two_stage", "gkd"}
    for method in recipe.compare.methods:  # the headline rows over six seeds, ablations and budget rows over three
        assert seeds[method] == ([0, 1, 2, 3, 4, 5] if method in headline else [0, 1, 2]), method
    assert {"no_kd", "vanilla_kd", "cwd", "mse_two_stage", "gkd"} <= set(recipe.compare.methods)
    assert len(recipe.compare.methods) >= 9
    by_method = {job.method: job.recipe for job in jobs}
    assert by_method["gkd_no_1a"].distill.task_agnostic is None
    assert by_method["gkd_no_mask"].distill.loss.options["mask_patch"] is False
    assert by_method["vanilla_kd"].distill.schedule == "one_stage"
    # the paper's protocol: every student gets the same labelled task schedule (480 steps of 8 images);
    # label-free stage-1 steps come on top, and the budget rows differ only in those
    for job in jobs[1:]:
        steps = schedule(job)
        assert steps["labelled_steps"] == 480, job.method
        if job.student == "distilled" and job.recipe.distill.schedule == "two_stage":
            assert job.recipe.head.batch_size == 8 and job.recipe.head.steps == 480, job.method
    budgets = [
        schedule(next(j for j in jobs if j.method == m))["distill_steps"] for m in recipe.compare.budget_curve.methods
    ]
    assert budgets == sorted(budgets) and budgets[-1] >= 10 * budgets[0]
    assert schedule(next(j for j in jobs if j.method == "gkd_no_1a"))["distill_steps"] == budgets[-1]


def test_the_protocol_never_trains_on_dusk():
    recipe = load_recipe(FULL)
    data = recipe.data
    for config in (data.source, data.source_val):
        assert config.options["domain"] == "day"
    assert data.targets["dusk"].options["domain"] == "dusk"
    assert data.proxy.name == "image_folder" and "imagenette" in str(data.proxy.root)  # no CamVid frame at all


def test_a_method_may_not_change_the_teacher():
    recipe = _with_methods({"bad": {"label": "bad", "overrides": {"models": {"teacher": {"kwargs": {"depth": 2}}}}}})
    with pytest.raises(RecipeError, match="share the recipe's teacher"):
        method_recipe(recipe, "bad", 0)


def test_a_new_loss_starts_from_its_own_default_options():
    recipe = _with_methods({"cwd": {"label": "CWD", "overrides": {"distill": {"loss": {"name": "cwd"}}}}})
    variant = method_recipe(recipe, "cwd", 3)
    assert variant.distill.loss.name == "cwd"
    assert "mask_patch" not in variant.distill.loss.options
    assert variant.seed == 3


def test_bad_overrides_and_unknown_methods_are_named(tmp_path):
    recipe = _with_methods({"typo": {"label": "typo", "overrides": {"distill": {"scheduel": "one_stage"}}}})
    with pytest.raises(RecipeError, match=r"(?s)compare\.methods\.typo\.overrides.*scheduel"):
        plan(recipe, tmp_path)
    with pytest.raises(RecipeError, match="unknown methods nope"):
        plan(load_recipe(FULL), tmp_path, methods=["nope"])
    with pytest.raises(RecipeError, match="lists no methods"):
        plan(_with_methods({}), tmp_path)
    data = load_recipe(FULL).model_dump(mode="json")
    data["compare"]["figure_domain"] = "night"
    with pytest.raises(RecipeError, match="figure_domain 'night' is none of source, dusk, day_test"):
        plan(parse_recipe(data), tmp_path)  # refused before anything trains, not by every job after it


def test_spread_and_drops():
    assert spread([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "values": [1.0, 3.0]}
    assert spread([5.0])["std"] == 0.0

    def run(seed: int, day: float, dusk: float, day_iou: list, dusk_iou: list) -> dict:
        domains = {"day": {"miou": day, "iou": day_iou}, "dusk": {"miou": dusk, "iou": dusk_iou}}
        return {"method": "m", "label": "M", "params_m": 1.0, "class_names": ["a", "b"], "seconds": 60.0,
                "seed": seed, "domains": domains}  # fmt: skip

    runs = [run(0, 50.0, 30.0, [40.0, 60.0], [20.0, None]), run(1, 52.0, 36.0, [44.0, 60.0], [30.0, None])]
    (row,) = summarize(runs, "day")
    assert row["seeds"] == [0, 1]
    assert row["drop"]["dusk"]["values"] == [20.0, 16.0]
    assert row["class_iou"]["dusk"] == [25.0, None]
    assert row["miou"]["day"]["mean"] == 51.0


@pytest.mark.slow
@pytest.mark.skipif(
    not (CAMVID_ROOT.is_dir() and IMAGENETTE_ROOT.is_dir()), reason=f"{CAMVID_ROOT} or {IMAGENETTE_ROOT} not present"
)
def test_compare_runs_tabulates_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's data roots are relative to the working directory
    out = tmp_path / "compare"
    methods = ["no_kd", "gkd", "vanilla_kd", "gkd_no_1a"]
    argv = ["compare", str(CAMVID_TINY_RECIPE), "--out", str(out), "--methods", *methods]
    assert main([*argv, "--max-seeds", "2"]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    rows = {row["method"]: row for row in summary["rows"]}
    assert list(rows) == ["teacher", "no_kd", "vanilla_kd", "gkd", "gkd_no_1a"]
    assert rows["gkd"]["seeds"] == [0, 1] and rows["gkd_no_1a"]["seeds"] == [0]
    assert summary["domains"] == ["day_test", "dusk", "source"]
    for row in rows.values():
        for domain in summary["domains"]:
            values = row["miou"][domain]["values"]
            assert len(values) == len(row["seeds"]) and row["miou"][domain]["mean"] == pytest.approx(np.mean(values))
        for seed_index, drop in enumerate(row["drop"]["dusk"]["values"]):
            day, dusk = row["miou"]["day_test"]["values"][seed_index], row["miou"]["dusk"]["values"][seed_index]
            assert drop == pytest.approx(day - dusk)
        assert len(row["class_iou"]["dusk"]) == 11
    teacher = load_recipe(out / TEACHER_JOB / "recipe.resolved.yaml")
    assert teacher.models.teacher.kwargs["embed_dim"] == 48
    # the shared teacher is the one file every distilled student learnt from
    teacher_file = out / TEACHER_JOB / "teacher_segmentor.safetensors"
    student_copy = out / "gkd" / "seed1" / "teacher_segmentor.safetensors"
    assert hashlib.sha256(student_copy.read_bytes()).digest() == hashlib.sha256(teacher_file.read_bytes()).digest()
    assert not (out / "no_kd" / "seed0" / "teacher_segmentor.safetensors").exists()
    markdown = (out / "comparison.md").read_text()
    assert "| GKD | 2 |" in markdown and "drop day_test→dusk" in markdown
    paired = {row["method"]: row for row in summary["paired"]["rows"]}
    assert summary["paired"]["method"] == "gkd" and list(paired) == ["no_kd", "vanilla_kd", "gkd_no_1a"]
    gkd, no_kd = rows["gkd"]["miou"]["dusk"]["values"], rows["no_kd"]["miou"]["dusk"]["values"]
    expected = [g - n for g, n in zip(gkd, no_kd, strict=True)]
    assert paired["no_kd"]["domains"]["dusk"]["differences"] == pytest.approx(expected)
    assert paired["gkd_no_1a"]["seeds"] == [0]
    assert "## GKD against each row, seed by seed" in markdown
    for name in ("domains.png", "frames.png", "per_class.png", "miou_vs_step.png"):  # the tiny recipe validates
        assert Image.open(out / name).format == "PNG" and f"]({name})" in markdown
    # each job saved its predictions on the same example frames: the report drew them without a model
    frames = [read_figure_frames(path) for path in sorted(out.glob("*/**/figure_frames.npz"))]
    assert len(frames) == 8 and {saved["domain"] for saved in frames} == {"dusk"}
    assert all(saved["image_paths"] == frames[0]["image_paths"] for saved in frames)
    assert frames[0]["frame_ids"] == [0, 2, 3, 5]  # 4 frames spread over the 6 dusk frames
    assert frames[0]["predictions"].dtype == np.uint8 and frames[0]["predictions"].shape == (
        4,
        360,
        480,
    )  # the labels of evaluation: native CamVid
    # a second call trains nothing: every job's result is kept; a job made before jobs saved their frames
    # gets them from its saved model
    results = sorted(out.glob("*/seed*/result.json"))
    stamps = [path.stat().st_mtime_ns for path in results]
    saved = out / "gkd" / "seed0" / "figure_frames.npz"
    before = read_figure_frames(saved)["predictions"]
    saved.unlink()
    assert main([*argv, "--max-seeds", "2"]) == 0
    assert [path.stat().st_mtime_ns for path in results] == stamps
    # the same model, predicted again in this process (another thread count: near-tied logits of a 2-step
    # model may flip a pixel's argmax)
    assert np.mean(read_figure_frames(saved)["predictions"] == before) > 0.99
    # the report's own keys may change on a finished comparison: it is re-tabulated, not retrained
    regrouped = tmp_path / "regrouped.yaml"
    regrouped.write_text(f"base: {CAMVID_TINY_RECIPE}\ncompare: {{paired_with: no_kd, reference_domain: source}}\n")
    assert main(["compare", str(regrouped), *argv[2:], "--max-seeds", "2"]) == 0
    assert [path.stat().st_mtime_ns for path in results] == stamps
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["paired"]["method"] == "no_kd" and summary["reference_domain"] == "source"
    assert load_recipe(out / "recipe.resolved.yaml").compare.paired_with == "no_kd"


def test_bad_command_line_is_exit_2(tmp_path, capsys):
    assert main(["compare", str(CAMVID_TINY_RECIPE), "--out", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["compare", str(CAMVID_TINY_RECIPE), "--out", str(tmp_path), "--methods", "nope"]) == 2


def test_a_frozen_teacher_without_a_head_needs_no_teacher_job(tmp_path):
    from gkd.compare import needs_teacher

    data = load_recipe(FULL).model_dump(mode="json")
    data["models"]["teacher"]["train_encoder"] = False  # a VFM's weights, frozen: nothing to train
    data["teacher_training"] = None
    mse = {"label": "MSE", "overrides": {"distill": {"schedule": "one_stage", "loss": {"name": "mse"}}}}
    methods = data["compare"]["methods"]
    data["compare"]["methods"] = {"no_kd": methods["no_kd"], "gkd": methods["gkd"], "mse": {**mse, "seeds": [0, 1, 2]}}
    jobs = plan(parse_recipe(data), tmp_path)
    assert [job.method for job in jobs] == ["no_kd"] * 6 + ["gkd"] * 6 + ["mse"] * 3
    assert not any(needs_teacher(job) for job in jobs)


def test_an_output_dir_of_another_recipe_is_refused(tmp_path, capsys):
    from gkd.recipe import dump_recipe

    (tmp_path / "recipe.resolved.yaml").write_text(dump_recipe(load_recipe(FULL)))
    assert main(["compare", str(CAMVID_TINY_RECIPE), "--out", str(tmp_path)]) == 2
    assert "another recipe" in capsys.readouterr().err
    figure_domain = tmp_path / "figure_domain.yaml"  # each job saved its frames of the figure domain
    figure_domain.write_text(f"base: {CAMVID_TINY_RECIPE}\ncompare: {{figure_domain: day_test}}\n")
    (tmp_path / "recipe.resolved.yaml").write_text(dump_recipe(load_recipe(CAMVID_TINY_RECIPE)))
    assert main(["compare", str(figure_domain), "--out", str(tmp_path)]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert not (tmp_path / TEACHER_JOB).exists()


def test_real_dinov2_weights_swap_in_for_the_built_teacher(tmp_path):
    from gkd.compare import needs_teacher

    swap = tmp_path / "swap.yaml"
    swap.write_text(
        f"base: {FULL}\nname: camvid_day2dusk_dinov2b\nmodels:\n"
        "  teacher: {name: dinov2_vitb14, train_encoder: false,\n"
        "            kwargs: {img_size: [144, 192], embed_dim: 768, depth: 12, num_heads: 12}}\n"
    )
    jobs = {(job.method, job.seed): job for job in plan(load_recipe(swap), tmp_path / "out")}
    assert jobs["teacher", 0].recipe.models.teacher.name == "dinov2_vitb14"
    assert not needs_teacher(jobs["gkd", 0])  # feature distillation reads the frozen VFM directly
    assert needs_teacher(jobs["vanilla_kd", 0])  # logit distillation needs the head the teacher job trains


@pytest.mark.slow
@pytest.mark.skipif(
    not (CAMVID_ROOT.is_dir() and IMAGENETTE_ROOT.is_dir()), reason=f"{CAMVID_ROOT} or {IMAGENETTE_ROOT} not present"
)
def test_protocol_rows_fidelity_and_budget_curve(tmp_path, monkeypatch):
    """The paper's protocol rows: the student's own frozen encoder and the teacher's (the ceiling), each with
    the head schedule; every student probed against the teacher; GKD budgets against the frozen row."""
    monkeypatch.chdir(REPO)
    recipe = tmp_path / "protocol.yaml"
    recipe.write_text(
        f"base: {CAMVID_TINY_RECIPE}\n"
        "compare:\n"
        "  paired_with: gkd\n"
        "  budget_curve: {baseline: frozen, methods: [gkd_short, gkd]}\n"
        "  methods:\n"
        "    frozen: {label: no KD (frozen), student: frozen}\n"
        "    ceiling: {label: teacher encoder + head, student: ceiling}\n"
        "    gkd_short: {label: GKD short, overrides: {distill: {task_agnostic: null, domain_agnostic: {steps: 1}}}}\n"
    )
    out = tmp_path / "compare"
    methods = ["frozen", "ceiling", "gkd_short", "gkd"]
    assert main(["compare", str(recipe), "--out", str(out), "--methods", *methods, "--max-seeds", "1"]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    rows = {row["method"]: row for row in summary["rows"]}
    head_steps = load_recipe(recipe).head.steps
    assert rows["frozen"]["schedule"] == {"labelled_steps": head_steps, "distill_steps": 0}
    assert rows["ceiling"]["schedule"] == {"labelled_steps": head_steps, "distill_steps": 0}
    assert rows["gkd"]["schedule"] == {"labelled_steps": head_steps, "distill_steps": 4}
    assert rows["gkd_short"]["schedule"]["distill_steps"] == 1
    # the frozen row's encoder is the student's initialisation, untouched; the ceiling's is the teacher's
    from gkd.models.checkpoint import load_segmentor

    frozen = load_segmentor(out / "frozen" / "seed0" / "frozen_segmentor.safetensors")[0]
    distilled = load_segmentor(out / "gkd" / "seed0" / "segmentor.safetensors")[0]
    teacher = load_segmentor(out / TEACHER_JOB / "teacher_segmentor.safetensors")[0]
    ceiling = load_segmentor(out / "ceiling" / "seed0" / "ceiling_segmentor.safetensors")[0]
    assert ceiling.encoder.embed_dim == teacher.encoder.embed_dim
    for name, value in teacher.encoder.state_dict().items():
        assert torch.equal(ceiling.encoder.state_dict()[name], value), name
    fresh = frozen.encoder.state_dict()
    assert any(not torch.equal(fresh[n], v) for n, v in distilled.encoder.state_dict().items())
    # fidelity: every student row, on each domain and the proxy; the ceiling and teacher are not probed
    assert "fidelity" not in rows["ceiling"] and "fidelity" not in rows["teacher"]
    fidelity = rows["gkd"]["fidelity"]
    assert set(fidelity) == {"source", "dusk", "day_test", "proxy"}
    assert "probe_miou" in fidelity["dusk"] and "probe_miou" not in fidelity["proxy"]
    assert all(entry["r2"]["mean"] <= 1.0 for entry in fidelity.values())
    curve = summary["budget_curve"]
    assert [point["method"] for point in curve["points"]] == ["gkd_short", "gkd"]
    gkd_dusk = rows["gkd"]["miou"]["dusk"]["values"][0] - rows["frozen"]["miou"]["dusk"]["values"][0]
    assert curve["points"][1]["domains"]["dusk"]["differences"] == pytest.approx([gkd_dusk])
    markdown = (out / "comparison.md").read_text()
    assert "## Feature fidelity" in markdown and "## Budget curve" in markdown and "| labelled steps |" in markdown
    for name in ("fidelity.png", "budget_curve.png"):
        assert Image.open(out / name).format == "PNG"
