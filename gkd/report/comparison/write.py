"""``comparison.json``, ``comparison.md`` and the figures of a comparison's output directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gkd.report.comparison.figures import (
    DOMAINS_PNG,
    FRAMES_PNG,
    MIOU_VS_STEP_PNG,
    PER_CLASS_PNG,
    plot_diagnostics,
    plot_domains,
    plot_miou_vs_step,
    plot_per_class,
)
from gkd.report.comparison.frames import figure_domain, plot_frames
from gkd.report.comparison.logs import ComparisonJob, validation_curves, wall_minutes
from gkd.report.comparison.machine import machine
from gkd.report.comparison.markdown import render_figure_links, render_markdown
from gkd.report.comparison.stats import budget_curve, class_iou_stats, summarize
from gkd.report.paired import paired_differences
from gkd.rundir import RESULT_FILE, TEACHER_JOB
from gkd.rundir import SOURCE_DOMAIN as SOURCE
from gkd.utils.io import read_json, write_json, write_text

if TYPE_CHECKING:
    from gkd.recipe import Recipe

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"


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
        **plot_diagnostics(summary, recipe.name, out),
    }
    for name, written in figures.items():
        if not written:
            (out / name).unlink(missing_ok=True)
    write_text(out / COMPARISON_MD, render_markdown(summary) + render_figure_links(figures, domain, curve_methods))
    return {**summary, "figures": figures}
