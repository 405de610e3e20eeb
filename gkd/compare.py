"""``gkd-compress compare``: the methods a recipe lists under ``compare.methods``, trained against each
other over several seeds, all distilling from one shared teacher, then tabulated and plotted.

Each method is the recipe with its ``overrides`` deep-merged in (a new ``distill.loss.name`` starts from
that loss's default options); methods may not change the teacher. The output directory holds::

    teacher/                   the recipe's teacher, trained once (the ``train-teacher`` stage)
    teacher_cache/<key>/       teacher outputs (``distill.teacher_cache``), built once, read by every job of that key
    <method>/seed<k>/          one ordinary run directory per method and seed (``gkd-compress`` can
                               inspect or resume it); ``figure_frames.npz`` holds the job's predictions on
                               the report's example frames; ``result.json`` is written last, so a job is
                               complete when it exists and a re-run skips it
    comparison.json / .md      every row's metrics, mean and spread over seeds (gkd/report/comparison/)
    domains.png, frames.png    mIoU per method and domain; example frames with each method's prediction
    per_class.png              per-class IoU on the figure domain
    miou_vs_step.png           validation mIoU against training step (when the jobs kept validation logs)

The report only reads these files: whoever owns a model (its job, or `backfill_figure_frames` for jobs
finished before jobs saved their frames) writes its predictions.

Jobs run in a pool of worker processes (``--workers``), each with its own share of the CPU threads: on a
small CPU, two single-threaded processes train these small models faster than one process with two
threads. Jobs that need the teacher start when it is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gkd.compare_jobs import (
    JOB_STAGES,
    Job,
    job_name,
    job_stages,
    job_steps,
    method_recipe,
    model_file,
    needs_teacher,
    plan,
    schedule,
)
from gkd.compare_pool import run_job, run_jobs
from gkd.compare_probes import (
    PROBED,
    backfill_fidelity,
    backfill_figure_frames,
    figure_frame_ids,
    job_fidelity,
    write_figure_frames,
)
from gkd.recipe import Recipe, check_same_recipe, dump_recipe
from gkd.rundir import LOGS_DIR, RECIPE_FILE, setup_logging
from gkd.utils.io import write_text

if TYPE_CHECKING:
    from gkd.tracking import Trackers

__all__ = [
    "JOB_STAGES",
    "PROBED",
    "ComparisonError",
    "Job",
    "backfill_fidelity",
    "backfill_figure_frames",
    "compare_methods",
    "figure_frame_ids",
    "job_fidelity",
    "job_name",
    "job_stages",
    "job_steps",
    "method_recipe",
    "model_file",
    "needs_teacher",
    "plan",
    "run_comparison",
    "run_job",
    "run_jobs",
    "schedule",
    "track_jobs",
    "write_figure_frames",
]


class ComparisonError(RuntimeError):
    """Jobs of a comparison that failed (each named, with its log folder)."""


def run_comparison(
    recipe: Recipe,
    out: Path,
    workers: int = 2,
    device: str = "cpu",
    methods: list[str] | None = None,
    max_seeds: int | None = None,
) -> dict:
    """Run every job not yet complete (``workers`` at a time), then write the comparison report; with trackers
    in the recipe's ``logging``, one parent run with a child run per finished job (`gkd.tracking`)."""
    from gkd.report.comparison import COMPARISON_JSON, COMPARISON_MD, write_comparison
    from gkd.tracking import trackers

    jobs = plan(recipe, out, methods, max_seeds)
    check_same_recipe(out, recipe, "a comparison")
    backends = trackers(recipe, out)  # connected now: a tracker that is not installed fails before any training
    write_text(out / RECIPE_FILE, dump_recipe(recipe))
    failures = run_jobs(jobs, out, workers, device)
    backfill_figure_frames(jobs, device)
    backfill_fidelity(jobs, out, device)
    summary = write_comparison(recipe, jobs, out) if not failures or any(job.done() for job in jobs) else None
    track_jobs(backends, recipe, "compare", jobs, [out / name for name in (COMPARISON_JSON, COMPARISON_MD)])
    if failures:  # what did finish is still tabulated
        raise ComparisonError("compare: " + "; ".join(failures))
    return summary


def compare_methods(
    recipe: Recipe | str | Path,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    workers: int = 2,
    device: str = "auto",
    methods: list[str] | None = None,
    max_seeds: int | None = None,
) -> dict:
    """``gkd-compress compare``: every method of ``compare.methods`` over its seeds, from one shared teacher,
    finished jobs reused; writes ``comparison.md`` / ``.json`` and figures into ``out``; returns what
    ``comparison.json`` holds, with ``out``.

    Args:
        recipe: a `Recipe` or a recipe YAML with ``compare.methods``.
        out: the comparison's folder (default ``runs/<recipe name>_compare``), locked while it runs.
        overrides: dotted ``key=value`` overrides of the recipe.
        workers: jobs trained at once (CPU threads split evenly).
        device: ``auto``, ``cpu`` or ``cuda``.
        methods: only these methods; max_seeds: only the first seeds of each.
    """
    from gkd.pipeline import recipe_and_folder
    from gkd.utils.lock import RunDirLock
    from gkd.utils.runtime import resolve_device

    if workers < 1 or (max_seeds is not None and max_seeds < 1):
        raise ValueError("--workers and --max-seeds must be at least 1")
    recipe, out = recipe_and_folder(recipe, overrides, out, "_compare")
    with RunDirLock(out):
        setup_logging(out / LOGS_DIR)
        summary = run_comparison(recipe, out, workers, resolve_device(device).type, methods, max_seeds)
    return {**summary, "out": str(out)}


def track_jobs(backends: Trackers | None, recipe: Recipe, kind: str, jobs: list[Job], artifacts: list[Path]) -> None:
    """The command's parent run and a child run per finished job (`gkd.tracking.track_group`)."""
    from gkd.tracking import TrackedJob, track_group

    finished = [TrackedJob(job_name(job), job.recipe, job.dir, job.student) for job in jobs if job.done()]
    track_group(backends, recipe, kind, finished, artifacts)
