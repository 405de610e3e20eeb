"""The live view of compare / sweep: job progress files read into ``status.json``, counts, steps and ETA."""

from __future__ import annotations

import json
import time

from gkd.compare import job_steps, plan
from gkd.progress import JobSteps, LiveView, read_progress, write_progress
from gkd.recipe import load_recipe, parse_recipe
from tests.helpers.paths import TINY_RECIPE


def test_status_file_mid_run_is_whole_json_with_each_jobs_phase_and_step(tmp_path):
    jobs = [
        JobSteps("gkd/seed0", tmp_path / "gkd", (("distill_domain_agnostic", 4), ("head", 6))),
        JobSteps("no_kd/seed0", tmp_path / "no_kd", (("no_kd", 6),)),
        JobSteps("frozen/seed0", tmp_path / "frozen", (("frozen", 6),)),
        JobSteps("teacher", tmp_path / "teacher", (("teacher", 5),)),
    ]
    write_progress(tmp_path / "frozen", "frozen", 6, 6)  # left by an earlier command: not this one's progress
    time.sleep(0.01)
    status_file = tmp_path / "out" / "status.json"
    view = LiveView("compare", jobs, status_file, lines=2)
    assert read_progress(tmp_path / "frozen", view.started) is None
    states = {"teacher": "done", "gkd/seed0": "running", "no_kd/seed0": "running", "frozen/seed0": "running"}
    view.update(states)
    first = json.loads(status_file.read_text())
    assert first["counts"] == {"done": 1, "running": 0, "queued": 3, "failed": 0}  # no worker started yet
    assert first["eta_s"] is None
    write_progress(tmp_path / "gkd", "head", 3, 6)
    write_progress(tmp_path / "no_kd", "starting")
    time.sleep(0.05)
    view.update(states)
    view.close()
    status = json.loads(status_file.read_text())
    by_name = {job["name"]: job for job in status["jobs"]}
    assert by_name["gkd/seed0"] == {
        "name": "gkd/seed0",
        "state": "running",
        "phase": "head",
        "step": 3,
        "steps": 6,
        "total_steps": 10,
        "done_steps": 7,  # stage 1b's 4 steps, then 3 of the head's
    }
    assert by_name["no_kd/seed0"]["phase"] == "starting" and by_name["no_kd/seed0"]["done_steps"] == 0
    assert by_name["frozen/seed0"]["state"] == "queued"
    assert status["counts"] == {"done": 1, "running": 2, "queued": 1, "failed": 0}
    assert status["steps"] == {"done": 5 + 7, "total": 27}
    assert status["eta_s"] > 0  # 7 steps in the time measured, 15 to go
    assert [p.name for p in status_file.parent.iterdir()] == ["status.json"]  # no temporary file left


def test_job_steps_follow_each_kind_of_job(tmp_path):
    data = load_recipe(TINY_RECIPE).model_dump(mode="json")
    joint = {"loss": {"name": "vanilla_kd"}, "joint": {"steps": 3, "batch_size": 8}}
    data["compare"]["methods"] = {
        "gkd": {"label": "GKD"},
        "frozen": {"label": "frozen", "student": "frozen"},
        "joint": {"label": "joint", "overrides": {"distill": {"schedule": "one_stage", **joint}}},
    }
    phases = {job.method: job_steps(job).phases for job in plan(parse_recipe(data), tmp_path)}
    assert phases == {
        "teacher": (("teacher", 6),),
        "gkd": (("distill_task_agnostic", 6), ("distill_domain_agnostic", 6), ("head", 6)),
        "frozen": (("frozen", 6),),
        "joint": (("distill_joint", 3),),
    }
