"""Experiment trackers (recipe ``logging``): MLflow in a SQLite store and W&B offline, fed from the run directory
of a tiny pipeline run and a tiny comparison; a recipe without ``logging`` is unchanged; the live status file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from gkd.cli import main
from gkd.engine import FileHashes, consumed
from gkd.recipe import RecipeError, check_same_recipe, dump_recipe, load_recipe
from gkd.stages import STAGES
from gkd.stages.context import Run
from gkd.tracking import flatten, mlflow_store, recipe_params, trackers
from gkd.utils.runtime import DistInfo
from tests.helpers.paths import TINY_RECIPE, TINY_SWEEP

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow not installed (pip install 'gkd-compress[track]')")


def _recipe(path: Path, logging: dict | None, **more) -> Path:
    data = {"base": str(TINY_SWEEP), **more}
    if logging is not None:
        data["logging"] = logging
    path.write_text(yaml.safe_dump(data))
    return path


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_a_recipe_without_logging_is_byte_for_byte_unchanged(tmp_path):
    plain = load_recipe(TINY_RECIPE)
    assert "logging" not in dump_recipe(plain)
    assert "logging" not in plain.model_dump(mode="json")
    tracked = load_recipe(_recipe(tmp_path / "r.yaml", {"mlflow": {"tracking_uri": "sqlite:///x.db"}}))
    assert tracked.logging.mlflow.tracking_uri == "sqlite:///x.db" and "logging:" in dump_recipe(tracked)
    untracked = load_recipe(_recipe(tmp_path / "u.yaml", None))
    # no stage record (and so no stage) sees the trackers: the same hashes with and without them
    for stage in STAGES:
        records = [
            consumed(Run(r, tmp_path, None, DistInfo()), stage, FileHashes(tmp_path / "h.json"))  # type: ignore[arg-type]
            for r in (tracked, untracked)
        ]
        assert records[0] == records[1], stage.name
    (tmp_path / "recipe.resolved.yaml").write_text(dump_recipe(untracked))
    check_same_recipe(tmp_path, tracked)  # a run dir accepts a new tracker
    with pytest.raises(RecipeError, match=r"logging\.wandb\.mode"):
        load_recipe(_recipe(tmp_path / "bad.yaml", {"wandb": {"mode": "offlin"}}))


def test_params_are_the_recipe_flattened_and_stores_are_sqlite(tmp_path):
    recipe = load_recipe(TINY_RECIPE)
    params = recipe_params(recipe)
    assert params["distill.task_agnostic.steps"] == "6" and params["models.student.kwargs.embed_dim"] == "32"
    assert params["name"] == "tiny" and params["data.img_size"] == "[112, 112]" and params["head.grad_clip"] == "1.0"
    assert params["models.teacher.weights"] == "null" and params["distill.loss.name"] == "qsd"
    assert flatten({"a": {"b": 1, "c": {}}}) == {"a.b": 1, "a.c": {}}
    from gkd.tracking_config import MlflowConfig

    # a directory (MLflow 3 refuses plain file stores) becomes a SQLite file in it, artifacts beside it
    uri, artifacts = mlflow_store(MlflowConfig(tracking_uri=str(tmp_path / "store")), tmp_path)
    assert uri == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "store" / "mlartifacts").as_uri()
    assert mlflow_store(MlflowConfig(tracking_uri=f"file:{tmp_path}/m.db"), tmp_path)[0] == f"sqlite:///{tmp_path}/m.db"


def test_a_tracker_that_is_not_installed_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    recipe = load_recipe(_recipe(tmp_path / "r.yaml", {"wandb": {"project": "p"}}))
    with pytest.raises(RecipeError, match=r"logging.wandb: .*gkd-compress\[track\]"):
        trackers(recipe, tmp_path)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> dict:
    """The tiny sweep recipe run once with MLflow (and W&B offline where installed)."""
    folder = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    logging = {"mlflow": {"tracking_uri": uri, "experiment": "tiny"}}
    if HAS_WANDB:
        logging["wandb"] = {"project": "tiny", "mode": "offline", "dir": str(folder / "wb")}
    recipe = _recipe(folder / "recipe.yaml", logging)
    out = folder / "run"
    assert main(["run", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    return {"folder": folder, "uri": uri, "recipe": recipe, "out": out}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@needs_mlflow
def test_mlflow_holds_params_metrics_and_artifacts_of_a_run(tracked_run, tmp_path):
    client, out = _client(tracked_run["uri"]), tracked_run["out"]
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny_sweep"
    params = run.data.params
    assert params["distill.task_agnostic.steps"] == "2" and params["models.student.kwargs.embed_dim"] == "32"
    assert params == recipe_params(load_recipe(out / "recipe.resolved.yaml"))
    assert not any(key.startswith("logging") for key in params)
    logs = sorted((out / "logs").glob("*.jsonl"))
    assert {path.stem for path in logs} >= {"teacher", "distill_task_agnostic", "distill_domain_agnostic", "head"}
    for path in logs:
        lines = _jsonl(path)
        for key in ("loss", "lr"):
            history = client.get_metric_history(run.info.run_id, f"{path.stem}/{key}")
            assert [(m.step, m.value) for m in history] == [(line["step"], pytest.approx(line[key])) for line in lines]
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "MODEL_CARD.md", "benchmark.json"} <= artifacts
    # another tracker on the finished run dir: nothing reruns (the stage records stand), the new run holds it all
    records = {path: path.read_bytes() for path in (out / "stages").glob("*.json")}
    stamps = {path: path.stat().st_mtime_ns for path in records}
    other = _recipe(tmp_path / "other.yaml", {"mlflow": {"tracking_uri": tracked_run["uri"], "experiment": "again"}})
    assert main(["run", str(other), "--out", str(out), "--device", "cpu"]) == 0
    assert {path: path.stat().st_mtime_ns for path in records} == stamps
    (again,) = client.search_runs([client.get_experiment_by_name("again").experiment_id])
    assert len(client.get_metric_history(again.info.run_id, "head/loss")) == len(_jsonl(out / "logs" / "head.jsonl"))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed (pip install 'gkd-compress[track]')")
def test_wandb_offline_run_holds_the_summary_metrics(tracked_run):
    from tests.helpers.wandb_offline import read_run

    (run_dir,) = (tracked_run["folder"] / "wb" / "wandb").glob("offline-run-*")
    (datastore,) = run_dir.glob("run-*.wandb")
    run = read_run(datastore)
    assert run["name"] == "tiny_sweep"
    last = _jsonl(tracked_run["out"] / "logs" / "head.jsonl")[-1]
    assert run["summary"]["head/step"] == last["step"]
    assert run["summary"]["head/loss"] == pytest.approx(last["loss"])
    assert run["config"]["distill.task_agnostic.steps"] == "2"
    assert {"report.json", "MODEL_CARD.md", "benchmark.json"} <= set(run["files"])
    assert (run_dir / "files" / "report.json").exists()


@pytest.mark.slow
@needs_mlflow
def test_compare_logs_a_parent_run_with_a_child_per_job(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    methods = {"no_kd": {"label": "no KD", "student": "no_kd"}, "gkd": {"label": "GKD"}}
    no_kd = {"steps": 2, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 3}
    recipe = _recipe(
        tmp_path / "compare.yaml",
        {"mlflow": {"tracking_uri": uri, "experiment": "cmp"}},
        compare={"no_kd": no_kd, "methods": methods},
    )
    out = tmp_path / "out"
    assert main(["compare", str(recipe), "--out", str(out), "--workers", "1", "--device", "cpu"]) == 0
    status = json.loads((out / "status.json").read_text())
    jobs = ["teacher", "no_kd/seed0", "gkd/seed0"]
    assert sorted(job["name"] for job in status["jobs"]) == sorted(jobs)
    assert status["counts"] == {"done": 3, "running": 0, "queued": 0, "failed": 0}
    assert status["steps"] == {"done": 2 + 2 + 6, "total": 10} and all(j["state"] == "done" for j in status["jobs"])
    client = _client(uri)
    experiment = client.get_experiment_by_name("cmp")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`gkd.kind` = 'compare'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(child.info.run_name for child in children) == sorted(jobs)
    assert {item.path for item in client.list_artifacts(parent.info.run_id)} >= {"comparison.json", "comparison.md"}
    gkd = next(child for child in children if child.info.run_name == "gkd/seed0")
    assert gkd.data.params["compare.methods"] == "{}" and gkd.data.params["seed"] == "0"
    head = _jsonl(out / "gkd" / "seed0" / "logs" / "head.jsonl")
    history = client.get_metric_history(gkd.info.run_id, "head/loss")
    assert [(m.step, m.value) for m in history] == [(line["step"], pytest.approx(line["loss"])) for line in head]
    assert "result.json" in {item.path for item in client.list_artifacts(gkd.info.run_id)}
