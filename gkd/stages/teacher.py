"""Stage ``train-teacher``: the teacher's head (and encoder, without VFM weights) trained on labelled source."""

from __future__ import annotations

from gkd.compress.objectives import TaskObjective
from gkd.engine import Stage
from gkd.models.checkpoint import save_segmentor
from gkd.preflight import TrainingUse
from gkd.rundir import TEACHER_FILE, validation_log
from gkd.stages.context import TRAIN_DATA, Run, files, teacher_segmentor, validated_data, validator

TRAINING = "teacher"  # the training phase: its checkpoint, logs and validation log


def stage_train_teacher(run: Run) -> None:
    """The teacher's head (and encoder, for recipes without VFM weights) trained on labeled source."""
    recipe = run.recipe
    segmentor = teacher_segmentor(run, trained=False)
    objective = TaskObjective(segmentor, freeze_encoder=not recipe.models.teacher.train_encoder)
    source = run.dataset(recipe.data.source, train=True, for_teacher=True)
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


STAGE = Stage(
    "train-teacher",
    stage_train_teacher,
    files(TEACHER_FILE),
    needed=lambda r: r.teacher_training is not None,
    distributed=True,
    data=lambda r: validated_data(r, r.teacher_training),
    trainings=lambda r: [TrainingUse(TRAINING, r.teacher_training, "source")],
    sections=(
        *TRAIN_DATA,
        "models.teacher",
        "models.teacher_decoder",
        "models.decoder",
        "data.teacher_transform",
        "teacher_training",
    ),
    weights=("teacher",),
    side_outputs=(validation_log(TRAINING),),
)
