"""The run directory: the name of every file a run writes, and the logging set-up of a run or job. At the
bottom of the house (it imports nothing of gkd), so every layer, the trainer and export included, names run
files from here and never from each other. (The "same recipe in this folder" guard is `gkd.recipe`'s.)
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path

RECIPE_FILE = "recipe.resolved.yaml"
TEACHER_FILE = "teacher_segmentor.safetensors"
ENCODER_FILE = "student_encoder.safetensors"
SEGMENTOR_FILE = "segmentor.safetensors"
BEST_SEGMENTOR_FILE = "segmentor_best.safetensors"
NO_KD_FILE = "no_kd_segmentor.safetensors"
FROZEN_FILE = "frozen_segmentor.safetensors"  # the student's own encoder, frozen, with a head (authors' no-KD)
CEILING_FILE = "ceiling_segmentor.safetensors"  # the teacher's frozen encoder with a student head
FIDELITY_TEACHER_FILE = "fidelity_teacher_tokens.pt"  # the teacher's tokens on the fidelity images
EVAL_FILE = "eval.json"
EXPORT_FILE = "export.json"
BENCHMARK_FILE = "benchmark.json"
SOURCE_SELECTION_FILE = "source_selection.json"
REPORT_JSON_FILE = "report.json"
REPORT_MD_FILE = "report.md"
DOMAIN_PLOT_FILE = "domain_miou.png"
PARETO_FILE = "pareto.png"
MODEL_CARD_FILE = "MODEL_CARD.md"
LOGS_DIR = "logs"
LOG_FILE = "gkd.log"
PROGRESS_FILE = f"{LOGS_DIR}/progress.json"  # a job's current phase and step (gkd.progress), rewritten as it trains
SOURCE_DOMAIN = "source"  # the held-out source split among the evaluated domains
RESULT_FILE = "result.json"  # a compare job's metrics, written last: the job is complete when it exists
TEACHER_JOB = "teacher"  # the compare job (and output sub-folder) that trains the shared teacher
TEACHER_CACHE_DIR = "teacher_cache"  # teacher_cache/<key>/: cached teacher outputs (run dir, or compare folder)
FIGURE_FRAMES_FILE = "figure_frames.npz"  # a compare job's predictions on the example frames of the report
FIGURE_FRAME_COUNT = 4  # example frames per compare job (evenly spread over the figure domain)


class JobKind(str, Enum):
    """What a comparison job trains (``compare.methods.<m>.student``; ``teacher`` is the comparison's own job).
    The value names its training phase and validation log too."""

    TEACHER = "teacher"
    DISTILLED = "distilled"  # GKD or a baseline: the distill (+ head) stages
    NO_KD = "no_kd"  # the student fine-tuned end to end, no teacher
    FROZEN = "frozen"  # the student's own encoder frozen + the head schedule (the authors' no-KD row)
    CEILING = "ceiling"  # the teacher's frozen encoder + the head schedule (what perfect distillation reaches)

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


MODEL_FILES = {  # the segmentor file each kind of job trains
    JobKind.TEACHER: TEACHER_FILE,
    JobKind.DISTILLED: SEGMENTOR_FILE,
    JobKind.NO_KD: NO_KD_FILE,
    JobKind.FROZEN: FROZEN_FILE,
    JobKind.CEILING: CEILING_FILE,
}


def validation_log(stage: str) -> str:
    """The run-relative JSONL file where training stage ``stage`` (``teacher``, ``no_kd``, ``distill_joint``,
    ``head``) appends ``{"step", "miou": {domain: mIoU}, "mean_target_miou"}`` every ``validate_every`` steps."""
    return f"{LOGS_DIR}/{stage}_validation.jsonl"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_dir: Path | None, console: bool = True, level: int = logging.INFO) -> None:
    """Log to ``log_dir/gkd.log`` (when given) and to stderr (when ``console``), replacing earlier handlers."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)] if console else []
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / LOG_FILE))
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=handlers, force=True)
