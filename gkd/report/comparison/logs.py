"""Reading a comparison's job folders: what the report needs of a job, its validation log (validation mIoU
against total optimizer step, past the distillation phases `gkd.distill_phases` declares) and the wall time of
the finished jobs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import yaml

from gkd.distill_phases import JOINT, PHASES
from gkd.report.comparison.stats import curve_stats
from gkd.rundir import RECIPE_FILE, RESULT_FILE, JobKind, validation_log
from gkd.utils.io import read_jsonl


class ComparisonJob(Protocol):
    """What the report needs of one job of the comparison (`gkd.compare.Job` has it)."""

    @property
    def method(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def student(self) -> str:  # a `gkd.rundir.JobKind` value
        ...

    @property
    def dir(self) -> Path: ...


def _validation_stage(job: ComparisonJob) -> tuple[str, int]:
    """The training stage whose validation log tracks the job's model, and the optimizer steps before it (a
    two-stage student's head trains after the distillation phases of `PHASES`, their steps read from the job's
    resolved recipe)."""
    if job.student != JobKind.DISTILLED:  # one training each, its log named after its kind
        return JobKind(job.student).value, 0
    distill = yaml.safe_load((job.dir / RECIPE_FILE).read_text())["distill"]
    if distill["schedule"] == "one_stage":
        return JOINT, 0
    return "head", sum((distill.get(phase.settings) or {}).get("steps", 0) for phase in PHASES)


def validation_history(job: ComparisonJob) -> dict[int, dict[str, float]] | None:
    """``{total optimizer step: {domain: mIoU}}`` from the job's validation log (``None`` when it kept none);
    a step logged twice (a resumed stage) keeps its last entry."""
    stage, offset = _validation_stage(job)
    path = job.dir / validation_log(stage)
    if not path.is_file():
        return None
    history = {}
    for number, entry in read_jsonl(path):
        try:
            history[offset + int(entry["step"])] = {domain: float(v) for domain, v in entry["miou"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            message = f"{path}:{number}: not a validation entry {{step, miou: {{domain: mIoU}}}} ({error})"
            raise ValueError(message) from error
    return history


def validation_curves(
    jobs: Sequence[ComparisonJob], methods: list[str], domains: list[str]
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{label: {domain: curve_stats}}`` of each of ``methods`` (in order) whose jobs kept validation logs,
    over those of its finished jobs that did."""
    curves = {}
    for method in methods:
        finished = [job for job in jobs if job.method == method and (job.dir / RESULT_FILE).is_file()]
        histories = [h for h in map(validation_history, finished) if h]
        if histories:
            curves[finished[0].label] = {domain: curve_stats(histories, domain) for domain in domains}
    return curves


def wall_minutes(done: Sequence[ComparisonJob], results: list[dict]) -> float:
    """From the first finished job's start (its result file's time minus its duration) to the last finish:
    the comparison's wall time even when it ran in several sittings (then it includes the pauses)."""
    finishes = [(job.dir / RESULT_FILE).stat().st_mtime for job in done]
    starts = [finish - result["seconds"] for finish, result in zip(finishes, results, strict=True)]
    return (max(finishes) - min(starts)) / 60
