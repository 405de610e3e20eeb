"""The example-frames figure: image, label and each shown method's prediction of frames of the figure domain,
read from the jobs' ``figure_frames.npz`` and the domain's dataset."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np

from gkd.report.comparison.figures import save_figure
from gkd.report.comparison.logs import ComparisonJob
from gkd.rundir import FIGURE_FRAMES_FILE, TEACHER_JOB
from gkd.rundir import SOURCE_DOMAIN as SOURCE

if TYPE_CHECKING:
    from gkd.recipe import Recipe

log = logging.getLogger("gkd")


def figure_domain(recipe: Recipe) -> str:
    """The domain of the example frames and of the per-class figure: ``compare.figure_domain``, else the first
    target."""
    return recipe.compare.figure_domain or next(iter(recipe.data.targets))


def _colorize(label: np.ndarray, palette: list) -> np.ndarray:
    """``(H, W)`` ids -> RGB; ignored pixels black."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    colors[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return colors[np.clip(label, 0, 255)]


def read_figure_frames(path: Path) -> dict:
    """A job's ``figure_frames.npz``: ``domain`` (str), ``frame_ids`` (indices into the domain's evaluation
    split), ``image_paths`` (each frame's image file) and ``predictions`` (uint8 ``(N, H, W)`` class ids at the
    evaluation size)."""
    with np.load(path) as frames:
        return {
            "domain": str(frames["domain"]),
            "frame_ids": [int(i) for i in frames["frame_ids"]],
            "image_paths": [str(p) for p in frames["image_paths"]],
            "predictions": frames["predictions"],
        }


def _first_jobs(jobs: Sequence[ComparisonJob]) -> dict[str, ComparisonJob]:
    """Each method's first job (its first seed), in plan order."""
    first: dict[str, ComparisonJob] = {}
    for job in jobs:
        first.setdefault(job.method, job)
    return first


def plot_frames(recipe: Recipe, jobs: Sequence[ComparisonJob], path: Path) -> bool:
    """Rows of example frames of the figure domain: image, label, the teacher's and each figure method's
    prediction (its first seed, read from the job's ``figure_frames.npz``). False (nothing written) when a
    shown job has no such file, or the jobs' files disagree on the frames."""
    from gkd.data.config import build_dataset, dataset_info
    from gkd.data.transforms import build_eval_transform

    compare, domain = recipe.compare, figure_domain(recipe)
    first = _first_jobs(jobs)
    shown = [TEACHER_JOB, *compare.figure_methods] if TEACHER_JOB in first else list(compare.figure_methods)
    frames = {}
    for name in shown:
        job = first.get(name)
        if job is None or not (job.dir / FIGURE_FRAMES_FILE).is_file():
            return False
        frames[job.label] = read_figure_frames(job.dir / FIGURE_FRAMES_FILE)
    if not frames:
        return False
    reference = next(iter(frames.values()))
    for label, saved in frames.items():
        if (saved["domain"], saved["image_paths"]) != (domain, reference["image_paths"]):
            log.warning("compare: frames.png not drawn: %s's %s shows other frames", label, FIGURE_FRAMES_FILE)
            return False
    config = recipe.data.source_val if domain == SOURCE else recipe.data.targets[domain]
    dataset = build_dataset(config, transform=build_eval_transform(recipe.data.eval_transform))
    palette = list(dataset_info(recipe.data.source)[2])
    ids = reference["frame_ids"]
    samples = [dataset.load(index) if index < len(dataset) else {"path": None} for index in ids]
    if [sample["path"] for sample in samples] != reference["image_paths"]:
        log.warning("compare: frames.png not drawn: the %s split no longer holds the saved frames", domain)
        return False
    columns = ["image", "label", *frames]
    size = (2.2 * len(columns), 1.75 * len(ids))
    figure, axes = plt.subplots(len(ids), len(columns), figsize=size, squeeze=False)
    for row, (index, sample) in enumerate(zip(ids, samples, strict=True)):
        panels = [sample["image"].permute(1, 2, 0).numpy(), _colorize(dataset[index]["label"].numpy(), palette)]
        panels += [_colorize(saved["predictions"][row], palette) for saved in frames.values()]
        for column, panel in enumerate(panels):
            axes[row][column].imshow(panel)
            axes[row][column].axis("off")
            if row == 0:
                axes[row][column].set_title(columns[column], fontsize=8)
    figure.suptitle(f"{recipe.name}: {domain} frames (first seed of each method)", fontsize=9)
    save_figure(figure, path, dpi=110)
    return True
