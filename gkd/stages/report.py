"""Stage ``report``: report.json, report.md, the model card and plots from the files the other stages wrote."""

from __future__ import annotations

from gkd.engine import Stage
from gkd.rundir import BENCHMARK_FILE, EVAL_FILE, EXPORT_FILE, MODEL_CARD_FILE, REPORT_JSON_FILE, REPORT_MD_FILE
from gkd.stages.context import Run, files


def stage_report(run: Run) -> None:
    """report.json, report.md and plots from the files the other stages wrote."""
    from gkd.report.report import write_report

    write_report(run.dir, run.recipe, run.class_names)


STAGE = Stage(
    "report",
    stage_report,
    files(REPORT_JSON_FILE, REPORT_MD_FILE, MODEL_CARD_FILE),
    inputs=files(EVAL_FILE),
    reads=files(EVAL_FILE, EXPORT_FILE, BENCHMARK_FILE),
)
