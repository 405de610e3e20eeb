"""The report of ``gkd-compress compare``: per method, mIoU on each domain (mean and spread over seeds),
the drop from the in-domain reference to each target, per-class IoU; plots of mIoU per domain, of per-class IoU
on the figure domain and of validation mIoU against training step, and an example-frames figure (image, label,
and each shown method's prediction).

It only reads files: each job's ``result.json``, its ``figure_frames.npz`` (the predictions its job saved for the
example frames), its validation logs and resolved recipe, and the frames' image and label files. It never builds
a model, and imports nothing above it (names of run files come from `gkd.rundir`, the distillation phases from
`gkd.distill_phases`).

Modules: `stats` (means and spreads over seeds), `logs` (the jobs' folders and validation logs), `figures` and
`frames` (the plots), `markdown` (``comparison.md``'s text), `machine` (where it ran), `write` (all of it)."""

from gkd.report.comparison.figures import MIOU_VS_STEP_PNG, PER_CLASS_PNG
from gkd.report.comparison.frames import figure_domain, plot_frames, read_figure_frames
from gkd.report.comparison.logs import ComparisonJob, validation_curves, validation_history
from gkd.report.comparison.stats import class_iou_stats, spread, summarize
from gkd.report.comparison.write import COMPARISON_JSON, COMPARISON_MD, write_comparison

__all__ = [
    "COMPARISON_JSON",
    "COMPARISON_MD",
    "MIOU_VS_STEP_PNG",
    "PER_CLASS_PNG",
    "ComparisonJob",
    "class_iou_stats",
    "figure_domain",
    "plot_frames",
    "read_figure_frames",
    "spread",
    "summarize",
    "validation_curves",
    "validation_history",
    "write_comparison",
]
