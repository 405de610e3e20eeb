"""`report.json` + `report.md` (+ plots) of a run, from the files the other stages wrote."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from gkd.report.frame_latency import frame_latency_lines, unmeasured_rows
from gkd.report.model_card import render_model_card
from gkd.report.pareto import benchmark_points, pareto_plot
from gkd.rundir import (
    BENCHMARK_FILE,
    DOMAIN_PLOT_FILE,
    EVAL_FILE,
    EXPORT_FILE,
    MODEL_CARD_FILE,
    PARETO_FILE,
    REPORT_JSON_FILE,
    REPORT_MD_FILE,
)
from gkd.utils.io import read_json, write_json, write_text

if TYPE_CHECKING:
    from gkd.data.config import DatasetConfig
    from gkd.recipe import Recipe

MODEL_LABELS = {
    "teacher": "Teacher",
    "no_kd": "Student, no distillation",
    "student": "Student, distilled",
    "student_best": "Student, distilled (best validation checkpoint)",
}


def _read(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def build_report(run_dir: Path, recipe: Recipe, class_names: list[str]) -> dict:
    """Everything a reader needs in one JSON document, from the files the other stages wrote in ``run_dir``."""
    evaluation = _read(run_dir / EVAL_FILE) or {"models": {}, "class_names": class_names}
    targets = list(recipe.data.targets)
    models = {}
    for name, result in evaluation["models"].items():
        domains = result["domains"]
        target_mious = [domains[t]["miou"] for t in targets if t in domains]
        mean_target = sum(target_mious) / len(target_mious) if target_mious else float("nan")
        models[name] = {
            "label": MODEL_LABELS.get(name, name),
            "params_m": result["params_m"],
            "encoder_params_m": result["encoder_params_m"],
            "miou": {domain: metrics["miou"] for domain, metrics in domains.items()},
            "mean_target_miou": mean_target,
            "drop_source_to_targets": domains["source"]["miou"] - mean_target if "source" in domains else None,
            "per_class_iou": {domain: metrics["iou"] for domain, metrics in domains.items()},
        }
    return {
        "recipe": recipe.name,
        "teacher_note": _teacher_note(recipe),
        "setup_note": _setup_note(recipe),
        "domains": {
            "source": recipe.data.source_val.model_dump(mode="json"),
            **{k: v.model_dump(mode="json") for k, v in recipe.data.targets.items()},
        },
        "class_names": evaluation["class_names"],
        "models": models,
        "export": _read(run_dir / EXPORT_FILE),
        "benchmark": _read(run_dir / BENCHMARK_FILE),
        "recipe_resolved": recipe.model_dump(mode="json"),
    }


def _split_name(config: DatasetConfig) -> str:
    """``name split`` of a dataset, or the generated domain of a synthetic one."""
    if config.name == "synthetic":
        return f"generated {config.options.get('domain', 'day')} scenes"
    return f"{config.name} {config.split}"


def _teacher_note(recipe: Recipe) -> str:
    """What the teacher is: trained in this run as a stand-in for a VFM, or loaded from its weights and frozen
    (which data it saw is `_setup_note`'s)."""
    teacher = recipe.models.teacher
    what = f"The teacher ({teacher.name}" + (f", {teacher.kwargs}" if teacher.kwargs else "") + ")"
    if teacher.train_encoder:
        return (
            f"{what} was trained in this run: it stands in for a vision foundation model, which this recipe has "
            "no weights for."
        )
    origin = (
        f"loaded from {teacher.weights}" if teacher.weights else "randomly initialised (the recipe names no weights)"
    )
    return f"{what} is {origin} and frozen."


def _setup_note(recipe: Recipe) -> str:
    """One paragraph: which data each model saw (what the teacher is, is `_teacher_note`'s)."""
    data = recipe.data
    sources = " and ".join(_split_name(config) for config in (data.source, *data.extra_sources))
    sentences = [f"Labels: the student learns from the source, {sources}, only."]
    if recipe.teacher_training is not None:  # the train-teacher stage runs (`gkd.stages.teacher`)
        trained = "The teacher" if recipe.models.teacher.train_encoder else "The teacher's head"
        if data.teacher_source is None:
            sentences.append(f"{trained} was trained on the same labelled source.")
        else:
            stand_in = (
                ", a stand-in for the broad data a foundation model is pre-trained on"
                if recipe.models.teacher.train_encoder
                else ""
            )
            sentences.append(f"{trained} was trained on labelled {_split_name(data.teacher_source)}{stand_in}.")
    if data.proxy is not None and recipe.distill.task_agnostic is not None:
        sentences.append(f"Task-agnostic distillation reads unlabelled {_split_name(data.proxy)} (the proxy set).")
    targets = ", ".join(f"{name} ({_split_name(config)})" for name, config in data.targets.items())
    sentences.append(f"The target domains {targets} are held out of every training stage.")
    return " ".join(sentences)


def plot_domain_miou(report: dict, path: Path) -> None:
    """Grouped bars: mIoU of each model on each domain."""
    models = report["models"]
    domains = list(report["domains"])
    figure, axes = plt.subplots(figsize=(1.8 + 1.6 * len(domains), 3.6))
    width = 0.8 / max(1, len(models))
    for i, result in enumerate(models.values()):
        xs = [d + (i - (len(models) - 1) / 2) * width for d in range(len(domains))]
        values = [result["miou"].get(domain, float("nan")) for domain in domains]
        bars = axes.bar(xs, values, width, label=result["label"])
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(range(len(domains)), domains)
    axes.set_ylabel("mIoU (%)")
    axes.set_title(f"{report['recipe']}: mIoU per domain")
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def render_markdown(report: dict) -> str:
    domains = list(report["domains"])
    lines = [
        f"# gkd-compress report: {report['recipe']}",
        "",
        report["teacher_note"],
        "",
        report["setup_note"],
        "",
        "## mIoU per domain (%)",
        "",
        "| model | params (M) | " + " | ".join(domains) + " | mean target | drop |",
        "|---|---:|" + "---:|" * len(domains) + "---:|---:|",
    ]
    for result in report["models"].values():
        cells = [_fmt(result["miou"].get(d)) for d in domains]
        lines.append(
            f"| {result['label']} | {result['params_m']:.2f} | "
            + " | ".join(cells)
            + f" | {_fmt(result['mean_target_miou'])} | {_fmt(result['drop_source_to_targets'])} |"
        )
    lines += [
        "",
        "'source' is the held-out split of the training domain; the other domains were never seen in "
        "training. drop = source mIoU - mean target mIoU.",
        "",
    ]
    student = report["models"].get("student")
    if student:
        lines += [
            "## Distilled student: IoU per class (%)",
            "",
            "| class | " + " | ".join(domains) + " |",
            "|---|" + "---:|" * len(domains),
        ]
        for c, name in enumerate(report["class_names"]):
            cells = [_fmt(student["per_class_iou"][d][c]) if d in student["per_class_iou"] else "n/a" for d in domains]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _export_markdown(report.get("export"))
    plots = report.get("plots", [])
    lines += _benchmark_markdown(report.get("benchmark"), PARETO_FILE if PARETO_FILE in plots else None)
    lines += [
        "## Files",
        "",
        "`report.json` holds every figure above, the per-class IoU of every model and the "
        "resolved recipe; `recipe.resolved.yaml` re-runs it.",
        "",
    ]
    return "\n".join(lines)


def _export_markdown(export: dict | None) -> list[str]:
    if not export:
        return []
    lines = [
        "## Export and parity with PyTorch fp32",
        "",
        f"Input `{export['input']['name']}` {export['input']['shape']} in [0, 1], opset {export['opset']}.",
        "",
        "| artifact | file | max abs diff | allowed | argmax agreement | parity |",
        "|---|---|---:|---:|---:|---|",
    ]
    not_checked = export.get("not_checked", {})
    for key, artifact in export["artifacts"].items():
        parity = artifact.get("parity", {})
        status = "ok" if parity.get("passed", True) else f"FAILED: {parity.get('reason', '')}"
        status = f"not checked: {not_checked[key]}" if key in not_checked else status
        lines.append(
            f"| {key} | `{Path(artifact.get('file', '')).name}` | {_fmt(parity.get('max_abs_diff'), 6)}"
            f" | {_fmt(parity.get('limit'), 6)}"
            f" | {_fmt(100 * parity['argmax_agreement'] if 'argmax_agreement' in parity else None, 3)} % | {status} |"
        )
    not_built = {**export.get("skipped", {}), **export.get("failed", {})}
    for key, reason in not_built.items():
        if key not in export["artifacts"]:
            lines.append(f"| {key} | not built: {reason} | | | | |")
    return [*lines, ""]


def _benchmark_markdown(benchmark: dict | None, pareto_plot: str | None = None) -> list[str]:
    if not benchmark:
        return []
    environment = benchmark.get("environment", {})
    lines = [
        "## Latency and accuracy of each runtime",
        "",
        f"Device `{benchmark['device']}`; {environment.get('cpu', '')} {environment.get('gpu', '') or ''}".rstrip(),
        "",
        "| runtime | batch | p50 ms | p90 ms | p99 ms | images/s | mean target mIoU | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    any_busy = False
    for key, entry in benchmark["runtimes"].items():
        miou = entry.get("miou")
        mean_miou = sum(miou.values()) / len(miou) if miou else None
        status = f"FAILED: {'; '.join(entry.get('failures', []))}" if entry.get("failed") else "ok"
        for batch, latency in entry["latency"].items():
            if "error" in latency:
                lines.append(f"| {key} | {batch} | {latency['error']} | | | | | |")
                continue
            row_status = status
            if latency.get("machine_busy"):  # timed while other processes competed for the CPUs
                any_busy = True
                busy = f"BUSY machine ({latency['other_cpus']:.1f} CPUs used by others)"
                row_status = busy if status == "ok" else f"{status}; {busy}"
            lines.append(
                f"| {key} | {batch} | {latency['p50_ms']:.2f} | {latency['p90_ms']:.2f} | {latency['p99_ms']:.2f} "
                f"| {latency['images_per_s']:.1f} | {_fmt(mean_miou)} | {row_status} |"
            )
    lines += unmeasured_rows(benchmark, "skipped", cells_before=6, cells_after=0)
    lines += ["", *frame_latency_lines(benchmark)]
    if any_busy:
        lines += [
            "Rows marked BUSY were timed while other processes competed for the CPUs: their latencies are not "
            "reliable. Re-measure on an idle machine with `gkd-compress run --out DIR --force benchmark`.",
            "",
        ]
    if pareto_plot:
        lines += [f"![latency vs mIoU]({pareto_plot})", ""]
    return lines


def write_report(run_dir: Path, recipe: Recipe, class_names: list[str]) -> None:
    """`report.json`, `report.md`, `domain_miou.png`, `pareto.png` and the model card `MODEL_CARD.md`.

    Args:
        run_dir: the run directory; the report reads its `eval.json`, `export.json` and `benchmark.json`.
        recipe: the run's resolved recipe.
        class_names: the source dataset's classes (used when nothing was evaluated yet).
    """
    run_dir = Path(run_dir)
    report = build_report(run_dir, recipe, class_names)
    if report["models"]:
        plot_domain_miou(report, run_dir / DOMAIN_PLOT_FILE)
        report["plots"] = [DOMAIN_PLOT_FILE]
        points, batch_size = benchmark_points(report["benchmark"]) if report["benchmark"] else ([], 0)
        if points:
            pareto_plot(points, run_dir / PARETO_FILE, title=f"Latency (batch {batch_size}) vs mIoU")
            report["plots"].append(PARETO_FILE)
    write_json(run_dir / REPORT_JSON_FILE, report)
    markdown = render_markdown(report)
    if report["models"]:
        markdown = markdown.replace(
            "## mIoU per domain (%)\n", f"## mIoU per domain (%)\n\n![mIoU per domain]({DOMAIN_PLOT_FILE})\n", 1
        )
    write_text(run_dir / REPORT_MD_FILE, markdown)
    write_text(run_dir / MODEL_CARD_FILE, render_model_card(report, recipe))
