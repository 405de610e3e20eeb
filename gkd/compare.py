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

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from gkd.progress import STATUS_FILE, JobSteps, LiveView, write_progress
from gkd.recipe import Recipe, RecipeError, check_same_recipe, dump_recipe, merge, parse_recipe
from gkd.rundir import (
    FIDELITY_TEACHER_FILE,
    FIGURE_FRAME_COUNT,
    FIGURE_FRAMES_FILE,
    LOGS_DIR,
    MODEL_FILES,
    RECIPE_FILE,
    RESULT_FILE,
    SOURCE_DOMAIN,
    TEACHER_CACHE_DIR,
    TEACHER_FILE,
    TEACHER_JOB,
    JobKind,
    setup_logging,
)
from gkd.utils.cpu import available_cpus
from gkd.utils.io import atomic_path, read_json, write_json, write_text
from gkd.utils.process import die_with_parent

if TYPE_CHECKING:
    import torch

    from gkd.tracking import Trackers

log = logging.getLogger("gkd")


class ComparisonError(RuntimeError):
    """Jobs of a comparison that failed (each named, with its log folder)."""


@dataclass(frozen=True)
class Job:
    """One training run of the comparison: the teacher, or one method at one seed."""

    method: str
    label: str
    seed: int
    student: JobKind
    recipe: Recipe
    dir: Path

    @property
    def result_file(self) -> Path:
        return self.dir / RESULT_FILE

    def done(self) -> bool:
        return self.result_file.is_file()


def _teacher_settings(recipe: Recipe) -> dict:
    models, data = recipe.models, recipe.data
    return {
        "teacher": models.teacher.model_dump(mode="json"),
        "teacher_decoder": (models.teacher_decoder or models.decoder).model_dump(mode="json"),
        "teacher_training": recipe.teacher_training and recipe.teacher_training.model_dump(mode="json"),
        "source": data.source.model_dump(mode="json"),
        "teacher_transform": (data.teacher_transform or data.train_transform).model_dump(mode="json"),
        "img_size": data.img_size,
    }


def method_recipe(recipe: Recipe, name: str, seed: int) -> Recipe:
    """The recipe of one method at one seed: ``recipe`` with the method's overrides, its methods list cleared."""
    method = recipe.compare.methods[name]
    base = recipe.model_dump(mode="json")
    base["compare"]["methods"] = {}
    new_loss = method.overrides.get("distill", {}).get("loss", {}).get("name")
    if new_loss is not None and new_loss != recipe.distill.loss.name:
        base["distill"]["loss"] = {"name": new_loss}  # the base loss's options do not apply to another loss
    try:
        variant = parse_recipe({**merge(base, method.overrides), "seed": seed, "name": f"{recipe.name}_{name}"})
    except RecipeError as error:
        raise RecipeError(f"compare.methods.{name}.overrides: {error}") from None
    if _teacher_settings(variant) != _teacher_settings(recipe):
        raise RecipeError(f"compare.methods.{name}.overrides: methods share the recipe's teacher; do not change it")
    if method.student == JobKind.NO_KD and variant.compare.no_kd is None:
        raise RecipeError(f"compare.methods.{name}: student no_kd needs compare.no_kd settings")
    return variant


def plan(recipe: Recipe, out: Path, methods: list[str] | None = None, max_seeds: int | None = None) -> list[Job]:
    """Every job of the comparison, the teacher first; ``methods`` restricts the recipe's methods,
    ``max_seeds`` runs only the first seeds of each."""
    listed = recipe.compare.methods
    if not listed:
        raise RecipeError("compare.methods: the recipe lists no methods to compare")
    unknown = sorted(set(methods or ()) - set(listed))
    if unknown:
        raise RecipeError(f"unknown methods {', '.join(unknown)}; the recipe lists {', '.join(listed)}")
    domains = [SOURCE_DOMAIN, *recipe.data.targets]
    if recipe.compare.figure_domain not in (None, *domains):
        raise RecipeError(f"compare.figure_domain {recipe.compare.figure_domain!r} is none of {', '.join(domains)}")
    base = recipe.model_copy(update={"compare": recipe.compare.model_copy(update={"methods": {}})})
    # no teacher job when nothing trains one (a frozen VFM distilled by feature losses only)
    jobs = (
        [Job(TEACHER_JOB, "teacher", recipe.seed, JobKind.TEACHER, base, out / TEACHER_JOB)]
        if recipe.teacher_training
        else []
    )
    for name, method in listed.items():
        if methods and name not in methods:
            continue
        for seed in method.seeds[:max_seeds]:
            variant = method_recipe(recipe, name, seed)
            jobs.append(Job(name, method.label, seed, method.student, variant, out / name / f"seed{seed}"))
    return jobs


def needs_teacher(job: Job) -> bool:
    from gkd.stages.distill import distill_inputs

    if job.student == JobKind.CEILING:
        return job.recipe.models.teacher.train_encoder
    return job.student == JobKind.DISTILLED and TEACHER_FILE in distill_inputs(job.recipe)


def model_file(job: Job) -> str:
    """The segmentor file a job trains, in its run directory."""
    return MODEL_FILES[job.student]


def schedule(job: Job) -> dict:
    """The optimizer steps a job spends: ``labelled_steps`` (on labelled source: the task schedule every
    method shares under the paper's protocol) and ``distill_steps`` (label-free stage-1 steps, extra)."""
    recipe, distill = job.recipe, job.recipe.distill
    if job.student == JobKind.TEACHER:
        return {"labelled_steps": recipe.teacher_training.steps, "distill_steps": 0}
    if job.student == JobKind.NO_KD:
        return {"labelled_steps": recipe.compare.no_kd.steps, "distill_steps": 0}
    if job.student in (JobKind.FROZEN, JobKind.CEILING):
        return {"labelled_steps": recipe.head.steps, "distill_steps": 0}
    if distill.schedule == "one_stage":  # distillation rides on the labelled steps
        return {"labelled_steps": distill.joint.steps, "distill_steps": 0}
    phases = (distill.task_agnostic, distill.domain_agnostic)
    return {"labelled_steps": recipe.head.steps, "distill_steps": sum(p.steps for p in phases if p is not None)}


def run_job(job: Job, teacher_file: Path, device: str, threads: int, teacher_caches: Path | None = None) -> dict:
    """Train and evaluate one job in this process (a pool worker); returns and writes its result. Teacher caches
    (``distill.teacher_cache``) live in ``teacher_caches``, shared by every job (default: the job's own folder)."""
    import torch

    from gkd.engine import run_all
    from gkd.stages import STAGES
    from gkd.stages.context import Run
    from gkd.stages.evaluate import evaluate_segmentors
    from gkd.stages.fidelity import teacher_fidelity_tokens
    from gkd.utils.runtime import DistInfo, resolve_device, seed_everything

    torch.set_num_threads(threads)
    setup_logging(job.dir / LOGS_DIR, console=False)
    sys.stderr = (job.dir / LOGS_DIR / "progress.log").open("a")  # progress bars of parallel jobs, kept apart
    write_text(job.dir / RECIPE_FILE, dump_recipe(job.recipe))
    write_progress(job.dir, "starting")
    start = time.perf_counter()
    seed_everything(job.recipe.seed)
    run = Run(job.recipe, job.dir, resolve_device(device), DistInfo(), teacher_caches=teacher_caches)
    if needs_teacher(job) and not run.file(TEACHER_FILE).is_file():
        _link(teacher_file, run.file(TEACHER_FILE))
    run_all(STAGES, run, only=[stage.name for stage in job_stages(job)])
    write_progress(job.dir, "evaluate")
    metrics = evaluate_segmentors(run, {"model": model_file(job)})["model"]
    tokens_file = teacher_file.parent / FIDELITY_TEACHER_FILE
    if job.student == JobKind.TEACHER or job.recipe.teacher_training is None:
        teacher_fidelity_tokens(run, tokens_file)
    if job.student in PROBED and tokens_file.is_file():  # else `backfill_fidelity` probes it after the teacher
        metrics["fidelity"] = job_fidelity(job, run, tokens_file)
    write_figure_frames(job, run.device)
    result = {
        "method": job.method,
        "label": job.label,
        "seed": job.seed,
        "class_names": run.class_names,
        "seconds": time.perf_counter() - start,
        "threads": threads,
        "schedule": schedule(job),
        **metrics,
    }
    write_json(job.result_file, result)
    return result


PROBED = (JobKind.DISTILLED, JobKind.NO_KD, JobKind.FROZEN)  # students whose features are probed against the teacher's


def job_fidelity(job: Job, run: object, tokens_file: Path) -> dict:
    """Feature fidelity (`gkd.stages.fidelity.encoder_fidelity`) of the encoder a job trained."""
    import torch

    from gkd.models.checkpoint import load_segmentor
    from gkd.stages.fidelity import encoder_fidelity

    encoder = load_segmentor(run.file(model_file(job)))[0].encoder.to(run.device)
    return encoder_fidelity(run, encoder, torch.load(tokens_file, weights_only=False))


def backfill_fidelity(jobs: Sequence[Job], out: Path, device: str = "cpu") -> None:
    """Probe the finished student jobs that ran before the teacher's tokens existed, and rewrite their results."""
    from gkd.stages.context import Run
    from gkd.utils.runtime import DistInfo, resolve_device

    tokens_file = out / TEACHER_JOB / FIDELITY_TEACHER_FILE
    finished = [(job, read_json(job.result_file)) for job in jobs if job.student in PROBED and job.done()]
    missing = [(job, result) for job, result in finished if "fidelity" not in result]
    if not missing or not tokens_file.is_file():
        return
    for job, result in tqdm(missing, desc="fidelity", unit="job"):
        run = Run(job.recipe, job.dir, resolve_device(device), DistInfo())
        write_json(job.result_file, {**result, "fidelity": job_fidelity(job, run, tokens_file)})


def figure_frame_ids(count: int, frames: int = FIGURE_FRAME_COUNT) -> list[int]:
    """The example frames of the report: ``frames`` indices evenly spread over a split of ``count`` samples."""
    return [int(i) for i in np.linspace(0, count - 1, frames).round().astype(int)]


def write_figure_frames(job: Job, device: torch.device) -> Path:
    """Predict the report's example frames (of ``compare.figure_domain``) with the job's trained model and save
    them, written atomically, as the job's ``figure_frames.npz``: ``domain``, ``frame_ids``, ``image_paths`` and
    ``predictions``, uint8 class ids ``(N, H, W)`` at the evaluation size."""
    import torch
    import torch.nn.functional as F

    from gkd.models.checkpoint import load_segmentor
    from gkd.report.comparison import figure_domain
    from gkd.stages.context import Run, evaluation_domains
    from gkd.utils.runtime import DistInfo

    run = Run(job.recipe, job.dir, device, DistInfo())
    if run.num_classes > 256:
        raise ValueError(f"{job.dir}: {run.num_classes} classes do not fit the uint8 maps of {FIGURE_FRAMES_FILE}")
    domain = figure_domain(job.recipe)
    dataset = run.dataset(evaluation_domains(run)[domain], train=False)
    model = load_segmentor(job.dir / model_file(job))[0].to(device).eval()
    ids, paths, predictions = figure_frame_ids(len(dataset)), [], []
    with torch.inference_mode():
        for index in ids:
            sample = dataset[index]
            image = sample["image"][None].to(device)
            image = F.interpolate(image, size=job.recipe.data.img_size, mode="bilinear", align_corners=False)
            logits = F.interpolate(model(image), size=sample["label"].shape, mode="bilinear", align_corners=False)
            predictions.append(logits[0].argmax(0).to(torch.uint8).cpu().numpy())
            paths.append(sample["path"])
    path = job.dir / FIGURE_FRAMES_FILE
    with atomic_path(path) as temporary, temporary.open("wb") as file:
        np.savez_compressed(
            file,
            domain=np.str_(domain),
            frame_ids=np.array(ids),
            image_paths=np.array(paths),
            predictions=np.stack(predictions),
        )
    return path


def backfill_figure_frames(jobs: Sequence[Job], device: str = "cpu") -> None:
    """Save the figure frames of finished jobs that lack them (jobs run before jobs saved their frames), from
    each job's saved model, without training; a job whose model file is gone is skipped with a warning."""
    from gkd.utils.runtime import resolve_device

    missing = [job for job in jobs if job.done() and not (job.dir / FIGURE_FRAMES_FILE).is_file()]
    if not missing:
        return
    log.info("compare: predicting the example frames of %d finished jobs that did not save them", len(missing))
    for job in tqdm(missing, desc="figure frames", unit="job"):
        if not (job.dir / model_file(job)).is_file():
            log.warning(
                "compare: %s seed %d: no %s to predict its figure frames with", job.method, job.seed, model_file(job)
            )
            continue
        write_figure_frames(job, resolve_device(device))


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy across file systems)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def job_name(job: Job) -> str:
    """A job's name in the live view, ``status.json`` and trackers: ``teacher``, ``<method>/seed<k>``."""
    return job.method if job.method == TEACHER_JOB else f"{job.method}/seed{job.seed}"


# The pipeline stages each kind of job runs.
JOB_STAGES = {
    JobKind.TEACHER: ("train-teacher",),
    JobKind.NO_KD: ("train-no-kd",),
    JobKind.DISTILLED: ("distill", "train-head"),
    JobKind.FROZEN: ("train-frozen-head",),
    JobKind.CEILING: ("train-ceiling-head",),
}


def job_stages(job: Job) -> list:
    """The stages of the pipeline's graph that ``job`` runs, in graph order."""
    from gkd.stages import STAGES

    names = JOB_STAGES.get(job.student, ())
    return [stage for stage in STAGES if stage.name in names and stage.needed(job.recipe)]


def job_steps(job: Job) -> JobSteps:
    """A job's training phases in order with their steps (the live view's progress and ETA), as its stages
    declare them."""
    phases = [(use.name, use.config.steps) for stage in job_stages(job) for use in stage.trainings(job.recipe)]
    return JobSteps(job_name(job), job.dir, tuple(phases))


def _collect(finished: set[Future], running: dict[Future, Job], states: dict[str, str], view: LiveView) -> list[str]:
    """Record the finished jobs (done or failed) in ``states``; returns the failures."""
    failures = []
    for future in finished:
        job = running.pop(future)
        if future.exception() is not None:
            states[job_name(job)] = "failed"
            failures.append(f"{job.method} seed {job.seed}: {future.exception()} (log: {job.dir / 'logs'})")
            log.error("compare: %s", failures[-1])
            continue
        states[job_name(job)] = "done"
        result = future.result()
        domains = ", ".join(f"{d} {m['miou']:.1f}" for d, m in result["domains"].items())
        view.write(f"{job.method} seed {job.seed}: {domains} ({result['seconds'] / 60:.1f} min)")
    return failures


def run_jobs(
    jobs: list[Job],
    out: Path,
    workers: int = 2,
    device: str = "cpu",
    status_file: Path | None = None,
    command: str = "compare",
) -> list[str]:
    """Run every job of ``jobs`` not yet complete, ``workers`` at a time, the teacher first, under one live view
    that also writes ``status_file`` (default ``out/status.json``); returns the failures (each naming its job and
    log folder)."""
    threads = max(1, available_cpus() // workers) if device == "cpu" else 1
    teacher = next((job for job in jobs if job.method == TEACHER_JOB), None)
    teacher_file = out / TEACHER_JOB / TEACHER_FILE

    def teacher_done() -> bool:
        return teacher is None or teacher.done()

    # seed by seed: an interrupted comparison has every method at its first seeds
    pending = sorted((job for job in jobs if not job.done()), key=lambda job: job.seed)
    log.info(
        "compare: %d jobs, %d to run, %d workers x %d threads, in %s", len(jobs), len(pending), workers, threads, out
    )
    failures: list[str] = []
    states = {job_name(job): "done" for job in jobs if job.done()}
    view = LiveView(command, [job_steps(job) for job in jobs], status_file or out / STATUS_FILE, workers)
    try:
        if not pending:  # all reused: no worker processes to start
            return failures
        with ProcessPoolExecutor(workers, get_context("spawn"), initializer=die_with_parent) as pool:
            running: dict[Future, Job] = {}

            def submit_ready() -> None:
                for job in [job for job in pending if job is teacher or not needs_teacher(job) or teacher_done()]:
                    pending.remove(job)
                    states[job_name(job)] = "running"  # the view shows it queued until its worker starts it
                    running[pool.submit(run_job, job, teacher_file, device, threads, out / TEACHER_CACHE_DIR)] = job

            submit_ready()
            while running:
                view.update(states)
                finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                failures += _collect(finished, running, states, view)
                if teacher_done() or not any(needs_teacher(job) for job in pending):
                    submit_ready()
    finally:
        view.update(states)
        view.close()
    if pending and not teacher_done():
        failures.append(f"{len(pending)} jobs not run: the teacher did not finish")
    return failures


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
    from gkd.pipeline import with_overrides
    from gkd.recipe import load_recipe
    from gkd.utils.lock import RunDirLock
    from gkd.utils.runtime import resolve_device

    if workers < 1 or (max_seeds is not None and max_seeds < 1):
        raise ValueError("--workers and --max-seeds must be at least 1")
    recipe = with_overrides(recipe, overrides) if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    out = Path(out) if out else Path("runs") / f"{recipe.name}_compare"
    with RunDirLock(out):
        setup_logging(out / LOGS_DIR)
        summary = run_comparison(recipe, out, workers, resolve_device(device).type, methods, max_seeds)
    return {**summary, "out": str(out)}


def track_jobs(backends: Trackers | None, recipe: Recipe, kind: str, jobs: list[Job], artifacts: list[Path]) -> None:
    """The command's parent run and a child run per finished job (`gkd.tracking.track_group`)."""
    from gkd.tracking import TrackedJob, track_group

    finished = [TrackedJob(job_name(job), job.recipe, job.dir, job.student) for job in jobs if job.done()]
    track_group(backends, recipe, kind, finished, artifacts)
