"""Latency tables shared by ``report.md`` and the model card: the whole-frame table (per runtime, one frame of
the dataset's size through the evaluation path the mIoU used, next to one model call at its input size) and
the rows of the runtimes that were not timed."""

from __future__ import annotations

from collections.abc import Sequence

FRAME_COLUMNS = ("frame p50 ms", "frame p90 ms", "frames/s", "model call p50 ms")


def table_header(*columns: str, numeric: Sequence[str] = ()) -> list[str]:
    """A markdown table's header and alignment rows; the ``numeric`` columns are right-aligned."""
    rule = "|".join("---:" if column in numeric else "---" for column in columns)
    return [f"| {' | '.join(columns)} |", f"|{rule}|"]


def _model_call(entry: dict) -> str:
    """p50 ms of the smallest timed batch at the model's input size, ``batch N: X ms``."""
    timed = {int(batch): latency for batch, latency in entry.get("latency", {}).items() if "p50_ms" in latency}
    if not timed:
        return "n/a"
    batch = min(timed)
    return f"{timed[batch]['p50_ms']:.2f} (batch {batch})"


def frame_latency_lines(benchmark: dict | None) -> list[str]:
    """Markdown lines: the frame path and a row per runtime (none where the benchmark timed no frame)."""
    frame = (benchmark or {}).get("frame")
    if not frame:
        return []
    height, width = frame["frame_size"]
    window = "x".join(str(v) for v in frame["window"])
    if frame["mode"] == "slide":
        path = (
            f"`slide` inference: {frame['windows']} windows of {window} (stride "
            f"{'x'.join(str(v) for v in frame['stride'])}, {frame['windows_per_call']} per model call) and their "
            "stitching"
        )
    else:
        path = f"`whole` inference: resized to {window}, the model, logits resized back"
    lines = [
        f"### Whole frame ({height}x{width}), as the mIoU was computed",
        "",
        f"One {height}x{width} frame from host memory to logits at its size: {path}, host copies included. "
        "Model call: the model alone at its input size (table above).",
        "",
        *table_header("runtime / precision", *FRAME_COLUMNS, numeric=FRAME_COLUMNS),
    ]
    for key, entry in benchmark["runtimes"].items():
        timed = entry.get("frame_latency")
        if not timed:
            continue
        if "error" in timed:
            lines.append(f"| {key} | {timed['error']} | | | {_model_call(entry)} |")
            continue
        busy = " (BUSY machine)" if timed.get("machine_busy") else ""
        lines.append(
            f"| {key} | {timed['p50_ms']:.2f}{busy} | {timed['p90_ms']:.2f} | {timed['frames_per_s']:.2f} "
            f"| {_model_call(entry)} |"
        )
    return [*lines, ""]


def unmeasured_rows(benchmark: dict, skipped_label: str, cells_before: int, cells_after: int) -> list[str]:
    """Latency-table rows of the runtimes not timed (``skipped``: not run here; ``not_checked``: its library is
    missing), the reason in the cell after ``cells_before`` empty ones, ``cells_after`` empty cells after it."""
    rows = []
    for label, section in ((skipped_label, "skipped"), ("not checked", "not_checked")):
        for key, why in benchmark.get(section, {}).items():
            rows.append(f"| {key} |" + " |" * cells_before + f" {label}: {why} |" + " |" * cells_after)
    return rows
