"""The pipeline's stages, one module each, every stage declared next to its body (`gkd.engine.Stage`): its
name, the files it reads and writes, its data, training phases and recipe sections. `STAGES` is the
registry the CLI, the comparison and the sweep hand to `gkd.engine`; `gkd.stages.context` holds the run
(`Run`) and what the stages share.
"""

from gkd.engine import Stage
from gkd.stages import benchmark, distill, evaluate, export, head, no_kd, report, teacher

STAGES: tuple[Stage, ...] = (
    teacher.STAGE,
    distill.STAGE,
    head.STAGE,
    head.FROZEN_STAGE,
    head.CEILING_STAGE,
    no_kd.STAGE,
    evaluate.STAGE,
    export.STAGE,
    benchmark.STAGE,
    report.STAGE,
)
