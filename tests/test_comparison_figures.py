"""The figures of `gkd-compress compare` drawn from tiny synthetic job folders (hand-written result.json,
validation logs and resolved recipes): per-class IoU on the figure domain and validation mIoU against training
step; and the rule that gkd/report only reads files (it imports nothing above it)."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gkd.recipe import load_recipe, parse_recipe
from gkd.report.comparison import (
    MIOU_VS_STEP_PNG,
    PER_CLASS_PNG,
    class_iou_stats,
    plot_frames,
    validation_curves,
    validation_history,
    write_comparison,
)
from tests.helpers.paths import CAMVID_TINY_RECIPE, DEFAULT_RECIPE, REPO

CLASSES = ["sky", "road", "car"]


@dataclass(frozen=True)
class FakeJob:
    """The attributes `write_comparison` reads of a `gkd.compare.Job`."""

    method: str
    label: str
    seed: int
    student: str
    dir: Path


def _job(root: Path, method: str, seed: int, student: str, dusk_iou: list, distill: dict | None = None) -> FakeJob:
    """A finished job folder: result.json (dusk IoU as given, day_test and source fixed) and its recipe."""
    job = FakeJob(method, method.upper(), seed, student, root / method / f"seed{seed}")
    (job.dir / "logs").mkdir(parents=True)
    present = [v for v in dusk_iou if v is not None]
    domains = {
        "day_test": {"miou": 60.0, "iou": [60.0, 60.0, 60.0]},
        "dusk": {"miou": sum(present) / len(present), "iou": dusk_iou},
        "source": {"miou": 70.0, "iou": [70.0, 70.0, 70.0]},
    }
    result = {"method": method, "label": job.label, "seed": seed, "class_names": CLASSES, "seconds": 30.0,
              "threads": 1, "params_m": 1.0, "encoder_params_m": 0.5, "domains": domains}  # fmt: skip
    (job.dir / "result.json").write_text(json.dumps(result))
    recipe = {"distill": distill or {"schedule": "two_stage", "task_agnostic": None, "domain_agnostic": None}}
    (job.dir / "recipe.resolved.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    return job


def _log(job: FakeJob, stage: str, entries: list[tuple[int, float, float]]) -> None:
    """``logs/<stage>_validation.jsonl`` with (step, dusk mIoU, day_test mIoU) entries."""
    lines = [json.dumps({"step": s, "miou": {"source": 1.0, "dusk": d, "day_test": t}}) for s, d, t in entries]
    (job.dir / "logs" / f"{stage}_validation.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def jobs(tmp_path: Path) -> list[FakeJob]:
    two_stage = {"schedule": "two_stage", "task_agnostic": {"steps": 2}, "domain_agnostic": {"steps": 3}}
    teacher = _job(tmp_path, "teacher", 0, "teacher", [50.0, 70.0, 30.0])
    no_kd = [_job(tmp_path, "no_kd", s, "no_kd", [10.0 + 10 * s, 40.0, None]) for s in (0, 1)]
    gkd = [_job(tmp_path, "gkd", s, "distilled", [20.0, 50.0 + 4 * s, 10.0], two_stage) for s in (0, 1, 2)]
    vanilla = _job(tmp_path, "vanilla_kd", 0, "distilled", [1.0, 2.0, 3.0], {"schedule": "one_stage"})
    return [teacher, *no_kd, vanilla, *gkd]


def test_per_class_statistics_are_means_and_sample_stds_over_seeds(jobs):
    results = [json.loads((job.dir / "result.json").read_text()) for job in jobs]
    stats = {row["method"]: row for row in class_iou_stats(results, "dusk")}
    assert list(stats) == ["teacher", "no_kd", "vanilla_kd", "gkd"]  # the order the jobs are listed in
    np.testing.assert_allclose(stats["no_kd"]["mean"][:2], [15.0, 40.0])
    np.testing.assert_allclose(stats["no_kd"]["std"][:2], [math.sqrt(50.0), 0.0])
    assert np.isnan(stats["no_kd"]["mean"][2]) and np.isnan(stats["no_kd"]["std"][2])  # no seed saw a car
    np.testing.assert_allclose(stats["gkd"]["mean"], [20.0, 54.0, 10.0])
    np.testing.assert_allclose(stats["gkd"]["std"], [0.0, 4.0, 0.0])  # 50, 54, 58
    np.testing.assert_allclose(stats["teacher"]["std"], [0.0, 0.0, 0.0])  # one seed: no spread


def test_validation_steps_count_every_optimizer_step_before_the_logged_stage(jobs):
    teacher, no_kd, _, vanilla, gkd = jobs[0], jobs[1], jobs[2], jobs[3], jobs[4]
    _log(teacher, "teacher", [(4, 30.0, 50.0), (8, 40.0, 60.0)])
    _log(no_kd, "no_kd", [(4, 10.0, 20.0)])
    _log(vanilla, "distill_joint", [(3, 5.0, 6.0)])
    _log(gkd, "head", [(2, 1.0, 2.0), (4, 3.0, 4.0)])
    _log(gkd, "distill_joint", [(1, 99.0, 99.0)])  # not the stage that trains a two-stage student's model
    assert validation_history(gkd) == {7: {"source": 1.0, "dusk": 1.0, "day_test": 2.0},
                                       9: {"source": 1.0, "dusk": 3.0, "day_test": 4.0}}  # fmt: skip
    assert list(validation_history(vanilla)) == [3]
    assert validation_history(jobs[5]) is None  # gkd seed 1 kept no log


def test_curves_average_the_seeds_that_logged_each_step(jobs):
    gkd = jobs[4:]
    _log(gkd[0], "head", [(2, 10.0, 20.0), (4, 30.0, 40.0)])
    _log(gkd[1], "head", [(2, 14.0, 20.0), (4, 34.0, 40.0), (6, 1.0, 1.0)])  # step 6: one seed only
    curves = validation_curves(jobs, ["teacher", "gkd", "no_kd"], ["dusk", "day_test"])
    assert list(curves) == ["GKD"]  # neither the teacher nor no-KD kept a log
    assert curves["GKD"]["dusk"]["steps"] == [7, 9]
    assert curves["GKD"]["dusk"]["mean"] == [12.0, 32.0]
    assert curves["GKD"]["dusk"]["std"] == pytest.approx([math.sqrt(8.0)] * 2)
    assert curves["GKD"]["day_test"]["std"] == [0.0, 0.0]


def test_a_broken_validation_line_is_named(jobs):
    (jobs[0].dir / "logs" / "teacher_validation.jsonl").write_text('{"step": 2, "miou": {"dusk": 1.0}}\n{"step": 4\n')
    with pytest.raises(ValueError, match=r"teacher_validation\.jsonl:2"):
        validation_history(jobs[0])


def test_the_report_draws_both_figures_and_links_them(jobs, tmp_path):
    _log(jobs[0], "teacher", [(4, 30.0, 50.0), (8, 40.0, 60.0)])
    _log(jobs[4], "head", [(2, 10.0, 20.0), (4, 30.0, 40.0)])
    out = tmp_path / "out"
    out.mkdir()
    summary = write_comparison(load_recipe(CAMVID_TINY_RECIPE), jobs, out)
    for name in (PER_CLASS_PNG, MIOU_VS_STEP_PNG, "domains.png"):
        assert Image.open(out / name).format == "PNG"
    assert summary["figures"] == {
        "domains.png": True,
        "frames.png": False,
        PER_CLASS_PNG: True,
        MIOU_VS_STEP_PNG: True,
        "fidelity.png": False,  # synthetic results carry no fidelity
        "budget_curve.png": False,
    }
    markdown = (out / "comparison.md").read_text()
    assert f"]({PER_CLASS_PNG})" in markdown and f"]({MIOU_VS_STEP_PNG})" in markdown
    assert "`frames.png`): not drawn" in markdown  # no job saved its figure frames
    assert "figures" not in json.loads((out / "comparison.json").read_text())


def test_without_validation_logs_the_step_figure_is_skipped_not_failed(jobs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MIOU_VS_STEP_PNG).write_bytes(b"stale")  # from an earlier report: not left behind
    summary = write_comparison(load_recipe(CAMVID_TINY_RECIPE), jobs, out)
    assert not summary["figures"][MIOU_VS_STEP_PNG] and not (out / MIOU_VS_STEP_PNG).exists()
    assert (
        "`miou_vs_step.png`): not drawn: no job of teacher, no_kd, gkd kept a validation log"
        in (out / "comparison.md").read_text()
    )
    assert Image.open(out / PER_CLASS_PNG).format == "PNG"


def test_frames_come_from_the_saved_predictions_and_the_dataset(tmp_path, caplog):
    from gkd.data.config import build_dataset

    # the default recipe's generated street scenes need no data files (its figures: dusk, [no_kd, gkd])
    data = load_recipe(DEFAULT_RECIPE).model_dump(mode="json")
    data["compare"].update(figure_domain="fog", figure_methods=["gkd"])
    recipe = parse_recipe(data)
    fog = build_dataset(recipe.data.targets["fog"])
    ids = [0, 16, 31, 47]
    paths = [fog.load(i)["path"] for i in ids]
    jobs = [FakeJob("teacher", "teacher", 0, "teacher", tmp_path / "teacher"),
            FakeJob("gkd", "GKD", 0, "distilled", tmp_path / "gkd")]  # fmt: skip

    def save(job: FakeJob, paths: list[str]) -> None:
        job.dir.mkdir(exist_ok=True)
        predictions = np.full((4, 112, 112), 3, dtype=np.uint8)
        np.savez(job.dir / "figure_frames.npz", domain="fog", frame_ids=ids, image_paths=paths, predictions=predictions)

    save(jobs[0], paths)
    assert not plot_frames(recipe, jobs, tmp_path / "frames.png")  # GKD saved no frames yet
    save(jobs[1], [*paths[:3], "synthetic://fog/test/46"])
    assert not plot_frames(recipe, jobs, tmp_path / "frames.png")
    assert "GKD's figure_frames.npz shows other frames" in caplog.text
    save(jobs[1], paths)
    assert plot_frames(recipe, jobs, tmp_path / "frames.png")
    assert Image.open(tmp_path / "frames.png").format == "PNG"


def test_reports_import_nothing_above_them():
    above = ("gkd.engine", "gkd.stages", "gkd.compare", "gkd.cli", "gkd.sweep", "gkd.predict", "gkd.preflight")
    for path in sorted((REPO / "gkd" / "report").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not [n for n in names if n.startswith(above)], f"{path.name} imports {names}"
