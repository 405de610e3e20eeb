"""The report of ``gkd-compress compare``: per method, mIoU on each domain (mean and spread over seeds),
the drop from the in-domain reference to each target, per-class IoU; plots of mIoU per domain, of per-class IoU
on the figure domain and of validation mIoU against training step, and an example-frames figure (image, label,
and each shown method's prediction).

It only reads files: each job's ``result.json``, its ``figure_frames.npz`` (the predictions its job saved for the
example frames), its validation logs and resolved recipe, and the frames' image and label files. It never builds
a model, and imports nothing above it (names of run files come from `gkd.rundir`)."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import yaml

from gkd.report.paired import paired_differences, render_paired
from gkd.rundir import (
    FIGURE_FRAMES_FILE,
    RECIPE_FILE,
    RESULT_FILE,
    TEACHER_JOB,
    validation_log,
)
from gkd.rundir import SOURCE_DOMAIN as SOURCE
from gkd.utils.io import atomic_path, read_json, read_jsonl, write_json, write_text

if TYPE_CHECKING:
    from gkd.recipe import Recipe

log = logging.getLogger("gkd")

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
DOMAINS_PNG = "domains.png"
FRAMES_PNG = "frames.png"
PER_CLASS_PNG = "per_class.png"
MIOU_VS_STEP_PNG = "miou_vs_step.png"
FIDELITY_PNG = "fidelity.png"
BUDGET_CURVE_PNG = "budget_curve.png"


class ComparisonJob(Protocol):
    """What the report needs of one job of the comparison (`gkd.compare.Job` has it)."""

    @property
    def method(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def student(self) -> str:  # "teacher" | "distilled" | "no_kd"
        ...

    @property
    def dir(self) -> Path: ...


def figure_domain(recipe: Recipe) -> str:
    """The domain of the example frames and of the per-class figure: ``compare.figure_domain``, else the first
    target."""
    return recipe.compare.figure_domain or next(iter(recipe.data.targets))


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
                **({"schedule": runs[0]["schedule"]} if "schedule" in runs[0] else {}),
                **({"fidelity": _fidelity_stats(runs)} if all("fidelity" in run for run in runs) else {}),
            }
        )
    return summary


def _fidelity_stats(runs: list[dict]) -> dict:
    """Each fidelity metric of each domain (`gkd.evaluate.fidelity`), mean and spread over the runs."""
    first = runs[0]["fidelity"]
    return {
        domain: {metric: spread([run["fidelity"][domain][metric] for run in runs]) for metric in metrics}
        for domain, metrics in first.items()
    }


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
    head = ["method", "seeds", "params (M)", "labelled steps", "stage-1 steps", f"{reference} mIoU"]
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
        steps = row.get("schedule", {})
        cells = [row["label"], str(len(row["seeds"])), f"{row['params_m']:.2f}"]
        cells += [str(steps.get("labelled_steps", "–")), str(steps.get("distill_steps", "–"))]
        cells += [_cell(row["miou"][reference])]
        for target in targets:
            cells += [_cell(row["miou"][target]), _cell(row["drop"][target])]
        cells += [_cell(row["miou"][SOURCE])] if reference != SOURCE else []
        lines.append("| " + " | ".join(cells) + " |")
    if "paired" in summary:
        label = next(row["label"] for row in rows if row["method"] == summary["paired"]["method"])
        lines += ["", f"## {label} against each row, seed by seed", ""]
        lines += [
            f"Δ = {label}'s mIoU − the row's at the same seed (same initialisation and data order), averaged over "
            f"the seeds both ran; won = seeds where {label} is higher.",
            "",
            render_paired(summary["paired"]["rows"], label, summary["domains"]),
        ]
    lines += render_fidelity(rows)
    if "budget_curve" in summary:
        lines += render_budget_curve(summary["budget_curve"])
    for domain in summary["domains"]:
        lines += ["", f"## Per-class IoU (%), {domain} (mean over seeds)", ""]
        lines += ["| method | " + " | ".join(summary["class_names"]) + " |"]
        lines += ["|" + "---|" * (len(summary["class_names"]) + 1)]
        for row in rows:
            values = ["–" if v is None else f"{v:.1f}" for v in row["class_iou"][domain]]
            lines.append(f"| {row['label']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def render_fidelity(rows: list[dict]) -> list[str]:
    """The ``## Feature fidelity`` section: ridge R² to the teacher's tokens and linear-probe mIoU per domain."""
    probed = [row for row in rows if "fidelity" in row]
    if not probed:
        return []
    domains = list(probed[0]["fidelity"])
    head = ["method"] + [f"{d} R²" for d in domains]
    head += [f"{d} probe mIoU" for d in domains if "probe_miou" in probed[0]["fidelity"][d]]
    lines = [
        "",
        "## Feature fidelity (student's last-layer tokens against the teacher's)",
        "",
        "Ridge R² of a linear map from the student's tokens to the teacher's, and mIoU of a least-squares linear "
        "probe from its tokens to each patch's class (token level); both fitted on source training images only "
        "(`gkd/evaluate/fidelity.py`), mean ± std over seeds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in probed:
        fidelity = row["fidelity"]
        cells = [row["label"]] + [_cell(fidelity[d]["r2"], 2) for d in domains]
        cells += [_cell(fidelity[d]["probe_miou"]) for d in domains if "probe_miou" in fidelity[d]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def budget_curve(rows: list[dict], baseline: str, methods: list[str], domains: list[str]) -> list[dict]:
    """Each of ``methods`` against ``baseline`` seed by seed, with its stage-1 steps: the points of the budget
    curve, fewest steps first (``domains[d]``: ``differences`` method − baseline per common seed, their
    ``mean``, ``wins``)."""
    by_method = {row["method"]: row for row in rows}
    if baseline not in by_method:
        return []
    points = []
    for method in [m for m in methods if m in by_method]:
        (entry,) = paired_differences([by_method[method], by_method[baseline]], method, domains)
        row = by_method[method]
        points.append(
            {
                "method": method,
                "label": row["label"],
                "distill_steps": row["schedule"]["distill_steps"],
                "seeds": entry["seeds"],
                "domains": entry["domains"],
            }
        )
    return sorted(points, key=lambda point: point["distill_steps"])


def render_budget_curve(curve: dict) -> list[str]:
    """The ``## Budget curve`` section: Δ mIoU against the baseline per stage-1 budget."""
    points, domains = curve["points"], curve["domains"]
    head = ["method", "stage-1 steps", "seeds"] + [f"{d}: Δ, seeds won" for d in domains]
    lines = [
        "",
        f"## Budget curve: each budget against {curve['baseline_label']}, seed by seed",
        "",
        f"Δ = the row's mIoU − {curve['baseline_label']}'s at the same seed, mean over seeds; won = seeds where "
        "the row is higher.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for point in points:
        cells = [point["label"], str(point["distill_steps"]), str(len(point["seeds"]))]
        for domain in domains:
            entry = point["domains"][domain]
            cells.append(f"{entry['mean']:+.1f}, {entry['wins']}/{len(point['seeds'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_budget_curve(curve: dict, title: str, path: Path) -> None:
    """Δ mIoU against the baseline (seeds as dots, mean as a line) over stage-1 steps, one panel per domain."""
    points, domains = curve["points"], curve["domains"]
    figure, axes = plt.subplots(1, len(domains), figsize=(3.6 * len(domains), 3.2), squeeze=False)
    steps = [point["distill_steps"] for point in points]
    for panel, domain in zip(axes[0], domains, strict=True):
        for point in points:
            values = point["domains"][domain]["differences"]
            panel.scatter([point["distill_steps"]] * len(values), values, s=10, color="tab:blue", alpha=0.5)
        panel.plot(steps, [point["domains"][domain]["mean"] for point in points], marker="o", color="tab:blue")
        panel.axhline(0, color="black", linewidth=0.6)
        panel.set_xscale("log")
        panel.set_title(domain, fontsize=9)
        panel.set_xlabel("stage-1 distillation steps", fontsize=8)
        panel.grid(linewidth=0.3)
    axes[0][0].set_ylabel(f"Δ mIoU vs {curve['baseline_label']} (points)")
    figure.suptitle(f"{title}: distillation budget (dots: seeds; line: mean)", fontsize=9)
    _save_figure(figure, path)


def plot_fidelity(rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars: each probed method's ridge R² to the teacher per domain (error bars: std over seeds)."""
    probed = [row for row in rows if "fidelity" in row]
    domains = list(probed[0]["fidelity"])
    figure, axes = plt.subplots(figsize=(2.0 + 0.8 * len(probed) * max(1, len(domains)) / 2, 3.6))
    _grouped_bars(axes, probed, domains, lambda row, domain: row["fidelity"][domain]["r2"], bar_labels=False)
    axes.set_ylabel("ridge R² to the teacher's tokens")
    axes.set_title(f"{title}: feature fidelity per domain", fontsize=9)
    _save_figure(figure, path)


def plot_domains(summary: dict, path: Path) -> None:
    """Grouped bars: each method's mIoU per domain, error bars = standard deviation over seeds."""
    rows, domains = summary["rows"], summary["domains"]
    figure, axes = plt.subplots(figsize=(2.0 + 0.9 * len(rows) * max(1, len(domains)) / 2, 4.0))
    _grouped_bars(axes, rows, domains, lambda row, domain: row["miou"][domain], bar_labels=True)
    axes.set_ylabel("mIoU (%)")
    axes.set_title(f"{summary['recipe']}: mIoU per method and domain (error bars: std over seeds)", fontsize=9)
    _save_figure(figure, path)


def _grouped_bars(
    axes: plt.Axes, rows: list[dict], domains: list[str], stats: Callable[[dict, str], dict], bar_labels: bool
) -> None:
    """One group of bars per row, one bar per domain: ``stats(row, domain)``'s mean, its std as error bar;
    ``bar_labels`` writes each mean above its bar."""
    width = 0.8 / len(domains)
    for i, domain in enumerate(domains):
        xs = [r + (i - (len(domains) - 1) / 2) * width for r in range(len(rows))]
        means = [stats(row, domain)["mean"] for row in rows]
        errors = [stats(row, domain)["std"] for row in rows]
        bars = axes.bar(xs, means, width, yerr=errors, capsize=2, label=domain)
        if bar_labels:
            axes.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    axes.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=30, ha="right", fontsize=8)
    axes.legend(fontsize=8)


def _save_figure(figure: plt.Figure, path: Path, dpi: int = 130) -> None:
    """Lay out, write atomically as PNG, and close ``figure``."""
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png")
    plt.close(figure)


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
    palette = list(dataset_info(recipe.data.source.name)[2])
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
    _save_figure(figure, path, dpi=110)
    return True


def class_iou_stats(results: list[dict], domain: str) -> list[dict]:
    """Per method (first-seen order): its label and, per class, the mean and sample standard deviation over
    seeds of the IoU on ``domain`` (std 0 for one seed; both NaN where no seed's split holds the class)."""
    by_method: dict[str, list[dict]] = {}
    for result in results:
        by_method.setdefault(result["method"], []).append(result)
    stats = []
    for runs in by_method.values():
        ious = np.array([[np.nan if v is None else v for v in run["domains"][domain]["iou"]] for run in runs])
        counts = (~np.isnan(ious)).sum(axis=0)
        sums = np.nansum(ious, axis=0)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        squares = np.nansum((ious - means) ** 2, axis=0)
        stds = np.where(counts > 1, np.sqrt(squares / np.maximum(counts - 1, 1)), np.where(counts == 1, 0.0, np.nan))
        stats.append({"method": runs[0]["method"], "label": runs[0]["label"], "mean": means, "std": stds})
    return stats


def plot_per_class(stats: list[dict], class_names: list[str], domain: str, title: str, path: Path) -> None:
    """Grouped bars: one group per class, one bar per method (``stats`` of `class_iou_stats`, in order), error
    bars = standard deviation over seeds. The figure widens with methods x classes so ten methods stay legible."""
    count = len(stats)
    figure, axes = plt.subplots(figsize=(max(8.0, 2.0 + 0.13 * count * len(class_names)), 4.5))
    width = 0.85 / count
    colors = plt.get_cmap("tab10" if count <= 10 else "tab20").colors
    for i, method in enumerate(stats):
        xs = np.arange(len(class_names)) + (i - (count - 1) / 2) * width
        axes.bar(
            xs,
            method["mean"],  # NaN (no seed's split holds the class): no bar
            width,
            yerr=method["std"],
            label=method["label"],
            color=colors[i % len(colors)],
            error_kw={"elinewidth": 0.6, "capsize": 1.0},
        )
    axes.set_xticks(range(len(class_names)), class_names, fontsize=8)
    axes.set_xlim(-0.5, len(class_names) - 0.5)
    axes.set_ylim(bottom=0)
    axes.set_ylabel(f"IoU on {domain} (%)")
    axes.set_title(f"{title}: per-class IoU on {domain} (mean over seeds, error bars: std)", fontsize=9)
    axes.legend(fontsize=7, ncol=min(count, 5), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    axes.grid(axis="y", linewidth=0.3)
    _save_figure(figure, path)


def _validation_stage(job: ComparisonJob) -> tuple[str, int]:
    """The training stage whose validation log tracks the job's model, and the optimizer steps before it (a
    two-stage student's head trains after the distillation stages; read from the job's resolved recipe)."""
    if job.student in ("teacher", "no_kd"):
        return job.student, 0
    distill = yaml.safe_load((job.dir / RECIPE_FILE).read_text())["distill"]
    if distill["schedule"] == "one_stage":
        return "distill_joint", 0
    return "head", sum((distill.get(stage) or {}).get("steps", 0) for stage in ("task_agnostic", "domain_agnostic"))


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


def curve_stats(histories: list[dict[int, dict[str, float]]], domain: str) -> dict[str, list[float]]:
    """Mean and sample standard deviation over seeds (0 for one) of ``domain``'s mIoU at each step every
    history logged it: ``{"steps", "mean", "std"}``."""
    steps = sorted(set.intersection(*({s for s, m in h.items() if domain in m} for h in histories)))
    curve: dict[str, list[float]] = {"steps": steps, "mean": [], "std": []}
    for step in steps:
        stats = spread([history[step][domain] for history in histories])
        curve["mean"].append(stats["mean"])
        curve["std"].append(stats["std"])
    return curve


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


def plot_miou_vs_step(curves: dict[str, dict[str, dict[str, list[float]]]], title: str, path: Path) -> None:
    """One panel per domain: each method's validation mIoU against total optimizer steps, the mean over seeds
    as a line and one standard deviation shaded."""
    domains = list(next(iter(curves.values())))
    figure, axes = plt.subplots(1, len(domains), figsize=(5.0 * len(domains), 3.8), squeeze=False, sharey=True)
    for panel, domain in zip(axes[0], domains, strict=True):
        for label, by_domain in curves.items():
            curve = by_domain[domain]
            steps, mean, std = np.array(curve["steps"]), np.array(curve["mean"]), np.array(curve["std"])
            (line,) = panel.plot(steps, mean, marker="o", markersize=2.5, linewidth=1.2, label=label)
            panel.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        panel.set_title(domain, fontsize=9)
        panel.set_xlabel("optimizer step (two-stage: distillation steps, then head)", fontsize=8)
        panel.grid(linewidth=0.3)
    axes[0][0].set_ylabel("validation mIoU (%)")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{title}: mIoU during training (mean over seeds, shaded: std)", fontsize=9)
    _save_figure(figure, path)


def render_figure_links(figures: dict[str, bool], domain: str, curve_methods: list[str]) -> str:
    """The ``## Figures`` section of ``comparison.md``: a link to each written figure, a line for each skipped."""
    captions = {
        DOMAINS_PNG: "mIoU per method and domain",
        FRAMES_PNG: f"{domain} frames: image, label and predictions",
        PER_CLASS_PNG: f"per-class IoU on {domain}",
        MIOU_VS_STEP_PNG: "validation mIoU against training step",
        FIDELITY_PNG: "feature fidelity: ridge R² to the teacher's tokens per domain",
        BUDGET_CURVE_PNG: "Δ mIoU against the baseline per stage-1 budget",
    }
    skipped = {
        FRAMES_PNG: f"not drawn: a shown method's first job has no `{FIGURE_FRAMES_FILE}`, or they show other frames",
        MIOU_VS_STEP_PNG: f"not drawn: no job of {', '.join(curve_methods) or 'compare.figure_methods'} kept a "
        "validation log "
        "(`logs/<stage>_validation.jsonl`, written when a training stage sets `validate_every`)",
        FIDELITY_PNG: "not drawn: no job recorded feature fidelity",
        BUDGET_CURVE_PNG: "not drawn: compare.budget_curve is not set, or its baseline did not run",
    }
    lines = ["", "## Figures", ""]
    for name, written in figures.items():
        lines += [f"![{captions[name]}]({name})" if written else f"{captions[name]} (`{name}`): {skipped[name]}.", ""]
    return "\n".join(lines)


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


def wall_minutes(done: Sequence[ComparisonJob], results: list[dict]) -> float:
    """From the first finished job's start (its result file's time minus its duration) to the last finish:
    the comparison's wall time even when it ran in several sittings (then it includes the pauses)."""
    finishes = [(job.dir / RESULT_FILE).stat().st_mtime for job in done]
    starts = [finish - result["seconds"] for finish, result in zip(finishes, results, strict=True)]
    return (max(finishes) - min(starts)) / 60


def _budget_curve_summary(recipe: Recipe, summary: dict) -> dict | None:
    """``compare.budget_curve``'s points on the target domains (`budget_curve`); ``None`` when not configured
    or its baseline did not run."""
    config = recipe.compare.budget_curve
    if config is None:
        return None
    targets = [d for d in summary["domains"] if d not in (summary["reference_domain"], SOURCE)]
    points = budget_curve(summary["rows"], config.baseline, config.methods, targets)
    if not points:
        return None
    baseline_label = next(row["label"] for row in summary["rows"] if row["method"] == config.baseline)
    return {"baseline_label": baseline_label, "domains": targets, "points": points}


def _plot_diagnostics(summary: dict, title: str, out: Path) -> dict[str, bool]:
    """The fidelity and budget-curve figures, where the summary has their numbers; which were drawn."""
    probed = any("fidelity" in row for row in summary["rows"])
    if probed:
        plot_fidelity(summary["rows"], title, out / FIDELITY_PNG)
    if "budget_curve" in summary:
        plot_budget_curve(summary["budget_curve"], title, out / BUDGET_CURVE_PNG)
    return {FIDELITY_PNG: probed, BUDGET_CURVE_PNG: "budget_curve" in summary}


def write_comparison(recipe: Recipe, jobs: Sequence[ComparisonJob], out: Path) -> dict:
    """``comparison.json``, ``comparison.md`` and the figures ``domains.png``, ``per_class.png``, ``frames.png``
    (when the shown jobs saved their frames) and ``miou_vs_step.png`` (when jobs kept validation logs); returns
    the summary, with ``figures``: which were written. A figure not drawn this time is removed, never left stale.

    Args:
        recipe: the comparison's recipe (reference and figure domains, figure methods).
        jobs: every job of the comparison, in plan order; the finished ones (with ``result.json``) are reported.
        out: the comparison's output directory.
    """
    done = [job for job in jobs if (job.dir / RESULT_FILE).is_file()]
    results = [read_json(job.dir / RESULT_FILE) for job in done]
    if not results:
        raise RuntimeError(f"compare: no finished job in {out}")
    reference, domain = recipe.compare.reference_domain, figure_domain(recipe)
    domains = list(results[0]["domains"])
    for name, chosen in (("reference_domain", reference), ("figure_domain", domain)):
        if chosen not in domains:
            raise ValueError(f"compare.{name} {chosen!r} is not an evaluated domain ({domains})")
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
    paired_with = recipe.compare.paired_with
    if paired_with is not None and any(row["method"] == paired_with for row in summary["rows"]):
        students = [row for row in summary["rows"] if row["method"] != TEACHER_JOB]
        summary["paired"] = {
            "method": paired_with,
            "rows": paired_differences(students, paired_with, summary["domains"]),
        }
    curve = _budget_curve_summary(recipe, summary)
    if curve is not None:
        summary["budget_curve"] = curve
    write_json(out / COMPARISON_JSON, summary)
    plot_domains(summary, out / DOMAINS_PNG)
    plot_per_class(class_iou_stats(results, domain), summary["class_names"], domain, recipe.name, out / PER_CLASS_PNG)
    curve_methods = [m for m in (TEACHER_JOB, *recipe.compare.figure_methods) if any(j.method == m for j in done)]
    curves = validation_curves(done, curve_methods, list(dict.fromkeys([domain, reference])))
    if curves:
        plot_miou_vs_step(curves, recipe.name, out / MIOU_VS_STEP_PNG)
    figures = {
        DOMAINS_PNG: True,
        FRAMES_PNG: plot_frames(recipe, jobs, out / FRAMES_PNG),
        PER_CLASS_PNG: True,
        MIOU_VS_STEP_PNG: bool(curves),
        **_plot_diagnostics(summary, recipe.name, out),
    }
    for name, written in figures.items():
        if not written:
            (out / name).unlink(missing_ok=True)
    write_text(out / COMPARISON_MD, render_markdown(summary) + render_figure_links(figures, domain, curve_methods))
    return {**summary, "figures": figures}
