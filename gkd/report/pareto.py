"""Latency / accuracy trade-off: every runtime x precision as a point, the Pareto front highlighted."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from gkd.utils.io import atomic_path


def pareto_front(points: list[dict]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower ``latency_ms``, higher ``miou``),
    ordered by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i]["latency_ms"], -points[i]["miou"]))
    front, best = [], float("-inf")
    for index in order:
        if points[index]["miou"] > best:
            front.append(index)
            best = points[index]["miou"]
    return front


def pareto_plot(points: list[dict], path: str | Path, title: str = "Latency vs mIoU") -> Path:
    """Scatter of ``points`` (``label``, ``latency_ms``, ``miou``) with the Pareto front as a line; a PNG."""
    if not points:
        raise ValueError("pareto_plot needs at least one point")
    path = Path(path)
    front = pareto_front(points)
    # A Figure without pyplot: no global backend state, safe in worker processes and tests.
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.add_subplot()
    others = [p for i, p in enumerate(points) if i not in front]
    axes.scatter([p["latency_ms"] for p in others], [p["miou"] for p in others], color="0.6", label="dominated")
    axes.plot(
        [points[i]["latency_ms"] for i in front],
        [points[i]["miou"] for i in front],
        color="C3",
        marker="o",
        label="Pareto front",
    )
    for point in points:
        axes.annotate(
            point["label"], (point["latency_ms"], point["miou"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("mIoU (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=120)
    return path
