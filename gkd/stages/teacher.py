"""Stage ``train-teacher``: the teacher's head (and encoder, without VFM weights) trained on labelled source
(or on ``data.teacher_source``, the stand-in for a VFM's own pre-training data)."""

from __future__ import annotations

from gkd.compress.objectives import TaskObjective
from gkd.models.checkpoint import save_segmentor
from gkd.rundir import TEACHER_FILE
from gkd.stages.context import Run, supervised_stage, teacher_data, teacher_segmentor, validator

TRAINING = "teacher"  # the training phase: its checkpoint, logs and validation log


def stage_train_teacher(run: Run) -> None:
    """The teacher's head (and encoder, for recipes without VFM weights) trained on labeled source."""
    recipe = run.recipe
    segmentor = teacher_segmentor(run, trained=False)
    objective = TaskObjective(segmentor, freeze_encoder=not recipe.models.teacher.train_encoder)
    source = run.dataset(recipe.data.teacher_source or recipe.data.source, train=True, for_teacher=True)
    config = recipe.teacher_training
    run.trainer(TRAINING, objective, source, config).fit(validator(run, segmentor, objective, TRAINING, config))
    if run.info.is_main:
        save_segmentor(
            run.file(TEACHER_FILE),
            segmentor,
            recipe.models.teacher,
            recipe.models.teacher_decoder or recipe.models.decoder,
            run.num_classes,
        )


STAGE = supervised_stage(
    "train-teacher",
    stage_train_teacher,
    TEACHER_FILE,
    TRAINING,
    lambda r: r.teacher_training,
    (
        "models.teacher",
        "models.teacher_decoder",
        "models.decoder",
        "data.teacher_source",
        "data.teacher_transform",
        "teacher_training",
    ),
    weights=("teacher",),
    trained_on=teacher_data,
    parts=lambda r: (("teacher",), ()) if r.models.teacher.train_encoder else (("teacher head",), ("teacher encoder",)),
)
