"""Latency / accuracy trade-off: every runtime x precision (x student) as a point, the Pareto front highlighted.

Readability: point labels are moved apart by adjustText (runtimes of one student often share an mIoU and
nearly a latency, and their labels would print on top of each other), and the mIoU axis spans at least
`MIN_MIOU_SPAN` points, so accuracies that agree to a hundredth of a point are drawn as agreeing.
"""

from __future__ import annotations

from pathlib import Path

from adjustText import adjust_text
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gkd.utils.io import atomic_path

MIN_MIOU_SPAN = 2.0  # mIoU points: the smallest range the accuracy axis shows


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


def benchmark_points(benchmark: dict) -> tuple[list[dict], int]:
    """The points of a benchmark stage's summary (``benchmark.json``): each runtime with an mIoU, its p50 at the
    smallest batch size timed and its mean mIoU over the target domains; and that batch size."""
    batch_size = min(int(size) for size in benchmark["config"]["batch_sizes"])
    points = []
    for key, entry in benchmark["runtimes"].items():
        latency = entry.get("latency", {}).get(str(batch_size), {})
        if entry.get("miou") and "p50_ms" in latency:
            miou = sum(entry["miou"].values()) / len(entry["miou"])
            points.append({"label": key, "latency_ms": latency["p50_ms"], "miou": miou})
    return points, batch_size


def miou_limits(values: list[float], min_span: float = MIN_MIOU_SPAN) -> tuple[float, float]:
    """Axis limits around ``values`` with 10% margins, widened about their middle to at least ``min_span``."""
    low, high = min(values), max(values)
    margin = 0.1 * (high - low)
    low, high = low - margin, high + margin
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    return low, high


def pareto_figure(points: list[dict], title: str = "Latency vs mIoU") -> Figure:
    """Scatter of ``points`` (``label``, ``latency_ms``, ``miou``; optional ``group``, coloured and listed in
    the legend) with the Pareto front as a dashed line."""
    if not points:
        raise ValueError("pareto_plot needs at least one point")
    front = pareto_front(points)
    # A Figure without pyplot: no global backend state, safe in worker processes and tests.
    figure = Figure(figsize=(7.2, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    groups = list(dict.fromkeys(p.get("group") for p in points))
    for g, group in enumerate(groups):
        members = [p for p in points if p.get("group") == group]
        axes.scatter(
            [p["latency_ms"] for p in members],
            [p["miou"] for p in members],
            color=f"C{g}" if group is not None else "0.5",
            label=group if group is not None else "runtime / precision",
            zorder=3,
        )
    axes.plot(
        [points[i]["latency_ms"] for i in front],
        [points[i]["miou"] for i in front],
        color="C3",
        linestyle="--",
        linewidth=1.2,
        marker="o",
        markersize=10,
        markerfacecolor="none",  # a ring around each point on the front
        label="Pareto front",
        zorder=2,
    )
    axes.set_ylim(*miou_limits([p["miou"] for p in points]))
    latencies = [p["latency_ms"] for p in points]
    spread = max(latencies) - min(latencies) or max(latencies) * 0.1 or 1.0
    axes.set_xlim(max(0.0, min(latencies) - 0.15 * spread), max(latencies) + 0.35 * spread)
    axes.set_xlabel("latency, p50 (ms)")
    axes.set_ylabel("mIoU (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()  # before the labels move: adjustText works in the final display coordinates
    texts = [axes.text(p["latency_ms"], p["miou"], p["label"], fontsize=7, zorder=4) for p in points]
    adjust_text(
        texts,
        x=latencies,
        y=[p["miou"] for p in points],
        ax=axes,
        max_move=None,
        expand=(1.1, 1.4),
        arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.5},
    )
    return figure


def pareto_plot(points: list[dict], path: str | Path, title: str = "Latency vs mIoU") -> Path:
    """`pareto_figure` of ``points`` saved as a PNG at ``path``."""
    path = Path(path)
    figure = pareto_figure(points, title)
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=120)
    return path
