"""The text of ``comparison.md``: the tables of the summary and the links to its figures."""

from __future__ import annotations

from gkd.report.comparison.figures import (
    BUDGET_CURVE_PNG,
    DOMAINS_PNG,
    FIDELITY_PNG,
    FRAMES_PNG,
    MIOU_VS_STEP_PNG,
    PER_CLASS_PNG,
)
from gkd.report.paired import render_paired
from gkd.rundir import FIGURE_FRAMES_FILE
from gkd.rundir import SOURCE_DOMAIN as SOURCE


def _cell(stats: dict, digits: int = 1) -> str:
    """A table cell: the mean, ``± std`` after it when there are several values."""
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
