"""Experiment trackers set in a recipe's ``logging`` section: MLflow (a local SQLite store, no server) and
Weights & Biases (offline by default); neither is on unless the recipe names it.

The trainer stays tracker-free: the command that owns a run directory (``gkd-compress run`` and the stage
commands, ``compare``, ``sweep``) opens one tracked run and *replays* the run directory's files into it. Each
training phase's ``logs/<phase>.jsonl`` (and its validation log) is replayed when its stage ends, whatever is left
when the command ends (stages skipped as up to date, or run in an earlier session), then the report, model card
and benchmark as artifacts. Replay rather than a per-step hook because the JSONL files already are the complete,
rank-0-only record of every logged step and survive resumes: a tracked run is complete even when training ran in
another process (the worker pool of ``compare``), in an earlier session or under torchrun; a slow or failing
tracker never slows or stops a training step; and a comparison's workers never write to one SQLite file at once
(its parent process logs one parent run and a child run per job when the jobs are done).

Metrics are ``<phase>/<key>`` at the phase's step (nested values, e.g. the validation mIoU per domain, as
``<phase>/miou.<domain>``); params are the resolved recipe flattened to dotted keys, without ``logging``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gkd.recipe import Recipe, RecipeError, results_settings
from gkd.rundir import (
    BENCHMARK_FILE,
    DOMAIN_PLOT_FILE,
    LOGS_DIR,
    MODEL_CARD_FILE,
    PARETO_FILE,
    REPORT_JSON_FILE,
    REPORT_MD_FILE,
    RESULT_FILE,
)
from gkd.tracking_config import LoggingConfig, MlflowConfig, WandbConfig

log = logging.getLogger("gkd")

# the files of a run directory logged as artifacts, where they exist
RUN_ARTIFACTS = (
    REPORT_JSON_FILE,
    REPORT_MD_FILE,
    DOMAIN_PLOT_FILE,
    PARETO_FILE,
    MODEL_CARD_FILE,
    BENCHMARK_FILE,
    RESULT_FILE,
)
EXTRA = "track"  # pip install 'gkd-compress[track]'


class TrackedRun(Protocol):
    """One run in one tracker."""

    def log_params(self, params: dict[str, str]) -> None: ...

    def log_history(self, prefix: str, rows: list[tuple[int, dict[str, float]]]) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


def _require(module: str, section: str) -> Any:
    """Import a tracker's package, or a recipe error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RecipeError(
            f"logging.{section}: the {section} package is not installed; pip install 'gkd-compress[{EXTRA}]'"
        ) from None


def mlflow_store(config: MlflowConfig, out: Path) -> tuple[str, str | None]:
    """The tracking URI and a new experiment's artifact location. A plain directory or ``file:`` URI (MLflow 3
    refuses file stores) becomes ``sqlite:///DIR/mlflow.db``; a sqlite file gets ``mlartifacts/`` beside it."""
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or str(out)
    if "://" not in uri or uri.startswith("file:"):
        folder = Path(uri.removeprefix("file://").removeprefix("file:"))
        uri = f"sqlite:///{(folder if folder.suffix == '.db' else folder / 'mlflow.db').resolve()}"
    artifacts = config.artifact_location
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        artifacts = artifacts or (database.parent / "mlartifacts").as_uri()
    return uri, artifacts


@dataclass
class MlflowRun:
    """A run of an MLflow store, written through `MlflowClient` (no global active run)."""

    client: Any
    run_id: str

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # the REST API's limit per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_history(self, prefix: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(f"{prefix}/{key}", value, now, step) for step, values in rows for key, value in values.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class MlflowTracker:
    """Runs of one MLflow experiment; a child run carries its parent's id (``mlflow.parentRunId``)."""

    def __init__(self, config: MlflowConfig, name: str, out: Path) -> None:
        tracking = _require("mlflow.tracking", "mlflow")
        uri, artifacts = mlflow_store(config, out)
        self.client = tracking.MlflowClient(tracking_uri=uri)
        experiment = config.experiment or name
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifacts)
        log.info("tracking: MLflow experiment %s in %s", experiment, uri)

    def start(self, name: str, parent: MlflowRun | None, kind: str) -> MlflowRun:
        tags = {"gkd.kind": kind, **({"mlflow.parentRunId": parent.run_id} if parent else {})}
        return MlflowRun(self.client, self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id)


@dataclass
class WandbRun:
    """A W&B run; each phase's metrics are plotted against that phase's own step (``<phase>/step``)."""

    run: Any
    group: str
    phases: set[str] = field(default_factory=set)

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_history(self, prefix: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        if prefix not in self.phases:
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.phases.add(prefix)
        for step, values in rows:
            self.run.log({f"{prefix}/step": step, **{f"{prefix}/{key}": value for key, value in values.items()}})

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class WandbTracker:
    """W&B runs of one project; a comparison's runs share a group (W&B has no nested runs)."""

    def __init__(self, config: WandbConfig, name: str, out: Path) -> None:
        self.wandb = _require("wandb", "wandb")
        self.config, self.project = config, config.project or name
        self.dir = Path(config.dir or out)
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, parent: WandbRun | None, kind: str) -> WandbRun:
        group = parent.group if parent else name
        run = self.wandb.init(
            project=self.project,
            entity=self.config.entity,
            mode=self.config.mode,
            dir=str(self.dir),
            name=name,
            group=group,
            job_type=kind,
            reinit="create_new",  # a comparison's child runs are open beside its parent
            settings=self.wandb.Settings(quiet=True),
        )
        return WandbRun(run, group)


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Nested mappings as one mapping of dotted keys (an empty mapping stays a leaf)."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def recipe_params(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe (without ``logging``) as tracker params: dotted keys, strings as they are, every
    other value as JSON (``6``, ``true``, ``null``, ``[112, 112]``)."""
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in flatten(results_settings(recipe)).items()
    }


def _numbers(line: dict) -> dict[str, float]:
    """A JSONL line's numeric values by dotted key, without ``step``."""
    flat = flatten({key: value for key, value in line.items() if key != "step"})
    return {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@dataclass
class Tracking:
    """One tracked run in every tracker of a recipe, fed from a run directory's files."""

    runs: list[TrackedRun]
    replayed: dict[Path, int] = field(default_factory=dict)  # JSONL file -> complete lines already logged

    def log_params(self, params: dict[str, str]) -> None:
        for run in self.runs:
            run.log_params(params)

    def sync_metrics(self, run_dir: Path) -> None:
        """Log the complete lines of every ``logs/*.jsonl`` not logged yet (each file's name is its prefix)."""
        for path in sorted((Path(run_dir) / LOGS_DIR).glob("*.jsonl")):
            lines = path.read_text().split("\n")[:-1]  # a line still being written has no newline yet
            rows = [json.loads(line) for line in lines[self.replayed.get(path, 0) :] if line.strip()]
            self.replayed[path] = len(lines)
            history = [(int(row["step"]), _numbers(row)) for row in rows if "step" in row]
            if history:
                for run in self.runs:
                    run.log_history(path.stem, history)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_file():
                for run in self.runs:
                    run.log_artifact(path)

    def close(self, run_dir: Path, failed: bool = False) -> None:
        """Replay what is left of the run directory, log its artifacts and end the run."""
        self.sync_metrics(run_dir)
        self.log_artifacts([Path(run_dir) / name for name in RUN_ARTIFACTS])
        for run in self.runs:
            run.finish(failed)


class Trackers:
    """The trackers a recipe's ``logging`` names, connected (their packages imported) when constructed."""

    def __init__(self, config: LoggingConfig, name: str, out: Path) -> None:
        self.backends: list[Any] = []
        if config.mlflow is not None:
            self.backends.append(MlflowTracker(config.mlflow, name, out))
        if config.wandb is not None:
            self.backends.append(WandbTracker(config.wandb, name, out))

    def start(self, name: str, parent: Tracking | None = None, kind: str = "run") -> Tracking:
        """A new tracked run in every tracker (``parent``: nested under that run)."""
        parents = parent.runs if parent else [None] * len(self.backends)
        return Tracking([b.start(name, p, kind) for b, p in zip(self.backends, parents, strict=True)])


def trackers(recipe: Recipe, out: Path) -> Trackers | None:
    """The recipe's trackers (None without any); ``out`` is the default store and W&B folder."""
    return Trackers(recipe.logging, recipe.name, Path(out)) if recipe.logging.enabled else None


@contextmanager
def tracked_run(recipe: Recipe, run_dir: Path) -> Iterator[Tracking | None]:
    """One tracked run of a pipeline command (None when the recipe has no tracker): its params now, the run
    directory's metrics and artifacts when the command ends, also when it fails (the run is then FAILED)."""
    backends = trackers(recipe, run_dir)
    if backends is None:
        yield None
        return
    tracking = backends.start(recipe.name)
    tracking.log_params(recipe_params(recipe))
    try:
        yield tracking
    except BaseException:
        tracking.close(run_dir, failed=True)
        raise
    tracking.close(run_dir)


@dataclass(frozen=True)
class TrackedJob:
    """A child run of a group: its name, recipe and run directory."""

    name: str
    recipe: Recipe
    dir: Path
    kind: str = "job"


def track_group(
    backends: Trackers | None, recipe: Recipe, kind: str, jobs: list[TrackedJob], artifacts: list[Path]
) -> None:
    """One parent run (``kind``: ``compare``, ``sweep``) with a child run per finished job, each replayed
    from its run directory; ``artifacts`` (the summary files) go to the parent."""
    if backends is None:
        return
    parent = backends.start(recipe.name, kind=kind)
    parent.log_params(recipe_params(recipe))
    for job in jobs:
        child = backends.start(job.name, parent=parent, kind=job.kind)
        child.log_params(recipe_params(job.recipe))
        child.close(job.dir)
    parent.log_artifacts(artifacts)
    for run in parent.runs:
        run.finish()
