"""The comparison's statistics: mean and spread over seeds of each method's metrics, per-class IoU, validation
curves, and the budget curve's paired differences (`gkd.report.paired`)."""

from __future__ import annotations

import numpy as np

from gkd.report.paired import paired_differences
from gkd.rundir import SOURCE_DOMAIN as SOURCE


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
    """The mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


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
