"""What a run would do, without training: each stage up to date or why it would run, the models and their
weights, the data, and every problem the pre-flight check found (`gkd.Pipeline.plan`, ``run --dry-run``)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gkd.cost import DeviceRate, PhaseCost, duration, measure_device_rate, phase_costs
from gkd.engine import HASHES_FILE, RECORDS_DIR, FileHashes, asked_for, decide
from gkd.recipe import Recipe

NOT_ASKED = "not among the stages asked for"


@dataclass(frozen=True)
class StagePlan:
    """One stage of the plan: whether the recipe has it, whether it would run and why, what it writes."""

    name: str
    needed: bool
    runs: bool
    reason: str
    outputs: tuple[str, ...]

    def line(self) -> str:
        status = "not in this recipe" if not self.needed else self.reason
        status = f"to run: {status}" if self.runs else status or "on request: its own command, or a comparison"
        return f"  {self.name:<18} {status:<48} -> {', '.join(self.outputs)}"


@dataclass(frozen=True)
class DataPlan:
    """One split the recipe reads."""

    role: str
    dataset: str
    split: str
    where: str
    samples: int | None = None

    def line(self) -> str:
        count = f", {self.samples} samples" if self.samples else ""
        return f"  {self.role}: {self.dataset}, split {self.split}, {self.where}{count}"


@dataclass(frozen=True)
class Plan:
    """A run's plan; ``ok`` when everything the recipe names is present and readable."""

    recipe: str
    run_dir: Path
    stages: list[StagePlan]
    models: list[str]
    data: list[DataPlan]
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    costs: list[PhaseCost] = field(default_factory=list)
    rate: DeviceRate | None = None
    ranks: int = 1

    @property
    def seconds(self) -> float | None:
        """The estimated training time of the phases that would run (a lower bound; None: not timed)."""
        times = [cost.seconds for cost in self.costs if cost.stage in self.to_run]
        return None if not times or None in times else sum(times)  # type: ignore[arg-type]

    @property
    def peak_gib_per_rank(self) -> float:
        """The largest estimated peak memory of a rank over the phases."""
        return max((cost.peak_gib_per_rank for cost in self.costs), default=0.0)

    def _cost_lines(self) -> list[str]:
        if not self.costs:
            return []
        how = f"FLOPs at the {self.rate}" if self.rate else "FLOPs; no time: the device is not visible here"
        lines = [f"training cost (estimate: {how}; {self.ranks} rank(s)):"]
        bound = self.rate.bound if self.rate else ""
        lines += [cost.line(bound) for cost in self.costs]
        seconds = self.seconds
        total = "not timed" if seconds is None else f"{bound}{duration(seconds)} for the stages to run"
        return [*lines, f"  total: {total}; peak ~{self.peak_gib_per_rank:.2f} GiB a rank"]

    @property
    def ok(self) -> bool:
        return not (self.problems or self.missing)

    @property
    def to_run(self) -> list[str]:
        """The stages that would run, in build order."""
        return [stage.name for stage in self.stages if stage.runs]

    def __str__(self) -> str:
        lines = [f"recipe: {self.recipe}", f"run directory: {self.run_dir}", "stages:"]
        lines += [stage.line() for stage in self.stages]
        lines += ["models:", *(f"  {model}" for model in self.models)]
        lines += ["data:", *(split.line() for split in self.data)]
        lines += self._cost_lines()
        if self.warnings:
            lines += ["warnings:", *(f"  {warning}" for warning in self.warnings)]
        if self.problems:
            lines += ["problems:", *(f"  {problem}" for problem in self.problems)]
        if self.missing:  # last, one path a line
            lines.append(f"missing: (relative paths are relative to the current directory, {Path.cwd()})")
            lines += [f"  {path}" for path in self.missing]
        if self.ok:
            lines.append("everything the recipe names is present and readable")
        return "\n".join(lines)


def _model_lines(recipe: Recipe, missing: list[str]) -> list[str]:
    lines = []
    for role, model in (("teacher", recipe.models.teacher), ("student", recipe.models.student)):
        weights = model.weights
        exists = weights is not None and Path(weights).exists()
        state = "random init" if weights is None else (str(weights) if exists else f"{weights} MISSING")
        if weights is not None and not exists:
            missing.append(str(weights))
        lines.append(f"{role}: {model.name} {model.kwargs or ''} weights: {state}")
    lines.append(
        f"decoder: {recipe.models.decoder.name}; distillation: {recipe.distill.schedule} / {recipe.distill.loss.name}"
    )
    return lines


def _data_plan(recipe: Recipe, num_samples: dict[str, int], missing: list[str]) -> list[DataPlan]:
    from gkd.data.config import describe_dataset

    data = recipe.data
    sets = {
        "source": data.source,
        **{f"extra source {i}": extra for i, extra in enumerate(data.extra_sources)},
        "source_val": data.source_val,
        **({"teacher source": data.teacher_source} if data.teacher_source else {}),
        **({"proxy": data.proxy} if data.proxy else {}),
        **{f"target {k}": v for k, v in data.targets.items()},
    }
    splits = []
    for role, config in sets.items():
        missing += [path for path in describe_dataset(config).get("missing", []) if path not in missing]
        where = "generated" if config.name == "synthetic" else f"root {config.root}"
        splits.append(DataPlan(role, config.name, config.split, where, num_samples.get(role)))
    return splits


def _warnings(recipe: Recipe) -> list[str]:
    teacher, student = recipe.models.teacher, recipe.models.student
    if teacher.weights is not None and student.weights is None:
        return [
            f"models.student ({student.name}) starts from random weights while the teacher is pre-trained: the "
            "paper's students start from ImageNet weights (F2L) or a smaller VFM (F2F); set models.student.weights"
        ]
    return []


def make_plan(
    recipe: Recipe,
    run_dir: Path,
    full_check: bool = False,
    device: torch.device | None = None,
    ranks: int = 1,
    tflops: float | None = None,
    only: Collection[str] | None = None,
) -> Plan:
    """The plan of ``recipe`` in ``run_dir``: the pre-flight check of everything the needed stages read (``full``
    decodes every image), each stage's decision under the engine's rule of "up to date", and the cost of each
    training phase (`gkd.cost`) at ``ranks`` ranks, timed at a stated ``tflops`` rate per rank, else at ``device``'s
    measured matmul rate (None: not timed). ``only``: the plan of a run restricted to these stages (`run_all`'s
    ``only``); the others are listed as not asked for and cost nothing."""
    from gkd.stages import STAGES
    from gkd.stages.checks import check_run_inputs
    from gkd.stages.context import Run
    from gkd.utils.runtime import DistInfo

    run = Run(recipe, run_dir, device=None, info=DistInfo())  # type: ignore[arg-type]
    checked = check_run_inputs(run, [s for s in STAGES if s.needed(recipe)], full=full_check, use_cache=False)
    hashes = FileHashes(run_dir / RECORDS_DIR / HASHES_FILE)
    wanted = {stage.name for stage in STAGES if asked_for(stage, recipe, only) and stage.needed(recipe)}
    stages = []
    for stage in STAGES:
        needed = stage.needed(recipe)
        decision = decide(run, stage, hashes) if stage.name in wanted else None
        runs, reason = (decision.run, decision.reason) if decision else (False, "")
        reason = reason if stage.name in wanted or not needed or stage.on_request else NOT_ASKED
        stages.append(StagePlan(stage.name, needed, runs, reason, stage.outputs(recipe)))
    missing: list[str] = []
    models = _model_lines(recipe, missing)
    data = _data_plan(recipe, checked.num_samples, missing)
    problems = [problem for problem in checked.problems if not any(path in problem for path in missing)]
    trainings = [(stage.name, use) for stage in STAGES if stage.name in wanted for use in stage.trainings(recipe)]
    if tflops is not None:
        rate: DeviceRate | None = DeviceRate("stated", "", tflops)
    else:
        rate = measure_device_rate(device) if device is not None else None
    try:
        costs = phase_costs(recipe, trainings, run.num_classes, rate, ranks)
    except Exception:  # a model that cannot be built is already one of the check's problems
        costs = []
    return Plan(recipe.name, run_dir, stages, models, data, problems, missing, _warnings(recipe), costs, rate, ranks)
