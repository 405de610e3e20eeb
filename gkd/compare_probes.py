"""What a comparison's report reads of each finished job (`gkd.compare`), besides its metrics: its
predictions on the report's example frames and the fidelity of its encoder's features to the teacher's;
written by the job, or backfilled for jobs finished before either existed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from gkd.compare_jobs import Job, model_file
from gkd.rundir import FIDELITY_TEACHER_FILE, FIGURE_FRAME_COUNT, FIGURE_FRAMES_FILE, TEACHER_JOB, JobKind
from gkd.utils.io import atomic_path, read_json, write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger("gkd")

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
