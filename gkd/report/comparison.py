"""The report of ``gkd-compress compare``: per method, mIoU on each domain (mean and spread over seeds),
the drop from the in-domain reference to each target, per-class IoU; a bar plot and an example-frames
figure (image, label, and each shown method's prediction)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from gkd.pipeline import SOURCE_DOMAIN as SOURCE
from gkd.pipeline import Run, evaluation_domains
from gkd.utils.io import atomic_path, read_json, write_json, write_text

if TYPE_CHECKING:
    from gkd.compare import Job
    from gkd.recipe import Recipe

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
DOMAINS_PNG = "domains.png"
FRAMES_PNG = "frames.png"


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), and the values."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": [float(v) for v in array]}


def summarize(results: list[dict], reference: str) -> list[dict]:
    """One row per method (in first-seen order) from the per-job results."""
    rows: dict[str, dict] = {}
    for result in results:
        rows.setdefault(result["method"], {"method": result["method"], "label": result["label"], "runs": []})
        rows[result["method"]]["runs"].append(result)
    summary = []
    for row in rows.values():
        runs = row.pop("runs")
        domains = list(runs[0]["domains"])
        num_classes = len(runs[0]["class_names"])
        summary.append(
            {
                **row,
                "seeds": [run["seed"] for run in runs],
                "params_m": runs[0]["params_m"],
                "minutes": spread([run["seconds"] / 60 for run in runs]),
                "miou": {d: spread([run["domains"][d]["miou"] for run in runs]) for d in domains},
                "drop": {
                    d: spread([run["domains"][reference]["miou"] - run["domains"][d]["miou"] for run in runs])
                    for d in domains
                    if d not in (reference, SOURCE)
                },
                "class_iou": {
                    d: [_mean_or_none([run["domains"][d]["iou"][c] for run in runs]) for c in range(num_classes)]
                    for d in domains
                },
            }
        )
    return summary


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _cell(stats: dict, digits: int = 1) -> str:
    if len(stats["values"]) > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def render_markdown(summary: dict) -> str:
    """The tables of ``comparison.md``."""
    reference, rows = summary["reference_domain"], summary["rows"]
    targets = [d for d in summary["domains"] if d not in (reference, SOURCE)]
    head = ["method", "seeds", "params (M)", f"{reference} mIoU"]
    for target in targets:
        head += [f"{target} mIoU", f"drop {reference}→{target}"]
    head += [f"{SOURCE} (val) mIoU"] if reference != SOURCE else []
    lines = [
        f"# {summary['recipe']}: method comparison",
        "",
        "mIoU (%) on each domain, mean ± sample standard deviation over seeds (one seed: no spread); "
        f"drop = {reference} mIoU − target mIoU of the same run. {len(rows)} rows, {summary['jobs']} training jobs: "
        f"{summary['wall_minutes']:.1f} min wall ({summary['job_minutes']:.1f} job-minutes) "
        f"on {summary['machine']['cpus']} CPU(s) ({summary['machine']['processor']}), "
        f"torch {summary['machine']['torch']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [row["label"], str(len(row["seeds"])), f"{row['params_m']:.2f}", _cell(row["miou"][reference])]
        for target in targets:
            cells += [_cell(row["miou"][target]), _cell(row["drop"][target])]
        cells += [_cell(row["miou"][SOURCE])] if reference != SOURCE else []
        lines.append("| " + " | ".join(cells) + " |")
    for domain in summary["domains"]:
        lines += ["", f"## Per-class IoU (%), {domain} (mean over seeds)", ""]
        lines += ["| method | " + " | ".join(summary["class_names"]) + " |"]
        lines += ["|" + "---|" * (len(summary["class_names"]) + 1)]
        for row in rows:
            values = ["–" if v is None else f"{v:.1f}" for v in row["class_iou"][domain]]
            lines.append(f"| {row['label']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot_domains(summary: dict, path: Path) -> None:
    """Grouped bars: each method's mIoU per domain, error bars = standard deviation over seeds."""
    rows, domains = summary["rows"], summary["domains"]
    figure, axes = plt.subplots(figsize=(2.0 + 0.9 * len(rows) * max(1, len(domains)) / 2, 4.0))
    width = 0.8 / len(domains)
    for i, domain in enumerate(domains):
        xs = [r + (i - (len(domains) - 1) / 2) * width for r in range(len(rows))]
        means = [row["miou"][domain]["mean"] for row in rows]
        errors = [row["miou"][domain]["std"] for row in rows]
        bars = axes.bar(xs, means, width, yerr=errors, capsize=2, label=domain)
        axes.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    axes.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("mIoU (%)")
    axes.set_title(f"{summary['recipe']}: mIoU per method and domain (error bars: std over seeds)", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=130, format="png")
    plt.close(figure)


def _colorize(label: np.ndarray, palette: list) -> np.ndarray:
    """``(H, W)`` ids -> RGB; ignored pixels black."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    colors[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return colors[np.clip(label, 0, 255)]


def plot_frames(recipe: Recipe, jobs: list[Job], path: Path, count: int = 4) -> bool:
    """Rows of example frames of ``compare.figure_domain``: image, label, the teacher's and each figure
    method's prediction (its first seed). False (nothing written) when a model is missing."""
    from gkd.compare import TEACHER_JOB, model_file
    from gkd.data.config import dataset_info
    from gkd.models.checkpoint import load_segmentor
    from gkd.utils.runtime import DistInfo

    compare = recipe.compare
    domain = compare.figure_domain or next(iter(recipe.data.targets))
    first = {}
    for job in jobs:
        first.setdefault(job.method, job)
    shown = [TEACHER_JOB, *compare.figure_methods] if TEACHER_JOB in first else list(compare.figure_methods)
    models = {}
    for name in shown:
        job = first.get(name)
        if job is None or not job.done():
            return False
        models[job.label] = load_segmentor(job.dir / model_file(job))[0].eval()
    if not models:
        return False
    any_job = first[shown[0]]
    run = Run(any_job.recipe, any_job.dir, torch.device("cpu"), DistInfo())
    dataset = run.dataset(evaluation_domains(run)[domain], train=False)
    palette = list(dataset_info(recipe.data.source.name)[2])
    picks = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    columns = ["image", "label", *models]
    figure, axes = plt.subplots(count, len(columns), figsize=(2.2 * len(columns), 1.75 * count), squeeze=False)
    for row, index in enumerate(picks):
        sample = dataset[int(index)]
        label = sample["label"].numpy()
        image = F.interpolate(sample["image"][None], size=recipe.data.img_size, mode="bilinear", align_corners=False)
        panels = [dataset.load(int(index))["image"].permute(1, 2, 0).numpy(), _colorize(label, palette)]
        with torch.inference_mode():
            for model in models.values():
                logits = F.interpolate(model(image), size=label.shape, mode="bilinear", align_corners=False)
                panels.append(_colorize(logits[0].argmax(0).numpy(), palette))
        for column, panel in enumerate(panels):
            axes[row][column].imshow(panel)
            axes[row][column].axis("off")
            if row == 0:
                axes[row][column].set_title(columns[column], fontsize=8)
    figure.suptitle(f"{recipe.name}: {domain} frames (first seed of each method)", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    return True


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the comparison ran: CPU count and model, OS, torch version."""
    return {
        "cpus": os.cpu_count(),
        "processor": _cpu_model(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def wall_minutes(done: list[Job], results: list[dict]) -> float:
    """From the first finished job's start (its result file's time minus its duration) to the last finish:
    the comparison's wall time even when it ran in several sittings (then it includes the pauses)."""
    finishes = [job.result_file.stat().st_mtime for job in done]
    starts = [finish - result["seconds"] for finish, result in zip(finishes, results, strict=True)]
    return (max(finishes) - min(starts)) / 60


def write_comparison(recipe: Recipe, jobs: list[Job], out: Path) -> dict:
    """``comparison.json``, ``comparison.md``, ``domains.png`` and (when its models exist) ``frames.png``."""
    done = [job for job in jobs if job.done()]
    results = [read_json(job.result_file) for job in done]
    if not results:
        raise RuntimeError(f"compare: no finished job in {out}")
    reference = recipe.compare.reference_domain
    domains = list(results[0]["domains"])
    if reference not in domains:
        raise ValueError(f"compare.reference_domain {reference!r} is not an evaluated domain ({domains})")
    summary = {
        "recipe": recipe.name,
        "reference_domain": reference,
        "domains": [reference, *[d for d in domains if d not in (reference, SOURCE)]]
        + ([SOURCE] if reference != SOURCE else []),
        "class_names": results[0]["class_names"],
        "jobs": len(results),
        "wall_minutes": wall_minutes(done, results),
        "job_minutes": sum(result["seconds"] for result in results) / 60,
        "machine": machine(),
        "rows": summarize(results, reference),
    }
    write_json(out / COMPARISON_JSON, summary)
    write_text(out / COMPARISON_MD, render_markdown(summary))
    plot_domains(summary, out / DOMAINS_PNG)
    summary["frames"] = plot_frames(recipe, jobs, out / FRAMES_PNG)
    return summary
