"""Stage ``train-no-kd``, the reference: the same student fine-tuned end to end on source, no distillation."""

from __future__ import annotations

from gkd.compress.objectives import TaskObjective
from gkd.models.checkpoint import save_segmentor
from gkd.rundir import NO_KD_FILE
from gkd.stages.context import Run, student_segmentor, supervised_stage, validator

TRAINING = "no_kd"  # the training phase: its checkpoint, logs and validation log


def stage_train_no_kd(run: Run) -> None:
    """Reference: the same student fine-tuned end to end on source, without distillation."""
    recipe = run.recipe
    segmentor = student_segmentor(run)
    objective = TaskObjective(segmentor, freeze_encoder=False)
    config = recipe.compare.no_kd
    trainer = run.trainer(TRAINING, objective, run.dataset(recipe.data.source, train=True), config)
    trainer.fit(validator(run, segmentor, objective, TRAINING, config))
    if run.info.is_main:
        save_segmentor(run.file(NO_KD_FILE), segmentor, recipe.models.student, recipe.models.decoder, run.num_classes)


STAGE = supervised_stage(
    "train-no-kd",
    stage_train_no_kd,
    NO_KD_FILE,
    TRAINING,
    lambda r: r.compare.no_kd,
    ("models.student", "models.decoder", "compare.no_kd"),
    weights=("student",),
)
