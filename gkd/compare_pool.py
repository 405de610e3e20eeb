"""The pool of worker processes that trains a comparison's jobs (`gkd.compare`), each job in its own
process with its share of the CPU threads, under one live view."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from gkd.compare_jobs import Job, job_name, job_stages, job_steps, model_file, needs_teacher, schedule
from gkd.compare_probes import PROBED, job_fidelity, write_figure_frames
from gkd.progress import STATUS_FILE, LiveView, write_progress
from gkd.recipe import dump_recipe
from gkd.rundir import (
    FIDELITY_TEACHER_FILE,
    LOGS_DIR,
    RECIPE_FILE,
    TEACHER_CACHE_DIR,
    TEACHER_FILE,
    TEACHER_JOB,
    JobKind,
    setup_logging,
)
from gkd.utils.cpu import available_cpus
from gkd.utils.io import write_json, write_text
from gkd.utils.process import die_with_parent

log = logging.getLogger("gkd")


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


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy across file systems)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


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
