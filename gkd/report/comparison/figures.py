"""The comparison's figures drawn from its numbers: mIoU per domain, per-class IoU, validation mIoU against
step, feature fidelity and the budget curve; and the file name of every figure of the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from gkd.utils.io import atomic_path

DOMAINS_PNG = "domains.png"
FRAMES_PNG = "frames.png"
PER_CLASS_PNG = "per_class.png"
MIOU_VS_STEP_PNG = "miou_vs_step.png"
FIDELITY_PNG = "fidelity.png"
BUDGET_CURVE_PNG = "budget_curve.png"


def plot_domains(summary: dict, path: Path) -> None:
    """Grouped bars: each method's mIoU per domain, error bars = standard deviation over seeds."""
    rows, domains = summary["rows"], summary["domains"]
    figure, axes = plt.subplots(figsize=(2.0 + 0.9 * len(rows) * max(1, len(domains)) / 2, 4.0))
    _grouped_bars(axes, rows, domains, lambda row, domain: row["miou"][domain], bar_labels=True)
    axes.set_ylabel("mIoU (%)")
    axes.set_title(f"{summary['recipe']}: mIoU per method and domain (error bars: std over seeds)", fontsize=9)
    save_figure(figure, path)


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
    save_figure(figure, path)


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
    save_figure(figure, path)


def plot_fidelity(rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars: each probed method's ridge R² to the teacher per domain (error bars: std over seeds)."""
    probed = [row for row in rows if "fidelity" in row]
    domains = list(probed[0]["fidelity"])
    figure, axes = plt.subplots(figsize=(2.0 + 0.8 * len(probed) * max(1, len(domains)) / 2, 3.6))
    _grouped_bars(axes, probed, domains, lambda row, domain: row["fidelity"][domain]["r2"], bar_labels=False)
    axes.set_ylabel("ridge R² to the teacher's tokens")
    axes.set_title(f"{title}: feature fidelity per domain", fontsize=9)
    save_figure(figure, path)


def plot_budget_curve(curve: dict, title: str, path: Path) -> None:
    """Δ mIoU against the baseline (seeds as dots, mean as a line) over stage-1 steps, one panel per domain."""
    points, domains = curve["points"], curve["domains"]
    figure, axes = plt.subplots(1, len(domains), figsize=(max(4.8, 3.6 * len(domains)), 3.4), squeeze=False)
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
    figure.suptitle(f"{title}: distillation budget\n(dots: seeds; line: mean)", fontsize=9)
    save_figure(figure, path)


def plot_diagnostics(summary: dict, title: str, out: Path) -> dict[str, bool]:
    """The fidelity and budget-curve figures, where the summary has their numbers; which were drawn."""
    probed = any("fidelity" in row for row in summary["rows"])
    if probed:
        plot_fidelity(summary["rows"], title, out / FIDELITY_PNG)
    if "budget_curve" in summary:
        plot_budget_curve(summary["budget_curve"], title, out / BUDGET_CURVE_PNG)
    return {FIDELITY_PNG: probed, BUDGET_CURVE_PNG: "budget_curve" in summary}


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


def save_figure(figure: plt.Figure, path: Path, dpi: int = 130) -> None:
    """Lay out, write atomically as PNG, and close ``figure``."""
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png")
    plt.close(figure)
