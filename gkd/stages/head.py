"""Stage ``train-head``, GKD's stage 2: a decoder on the frozen distilled encoder; and the same schedule on
other frozen encoders, the on-request stages ``train-frozen-head`` (the student's own encoder: the authors'
no-KD row) and ``train-ceiling-head`` (the teacher's encoder: what perfect distillation reaches)."""

from __future__ import annotations

import torch

from gkd.compress.objectives import TaskObjective
from gkd.engine import Stage
from gkd.models.checkpoint import save_segmentor
from gkd.models.decoders import build_decoder
from gkd.models.segmentor import Segmentor
from gkd.preflight import TrainingUse
from gkd.rundir import (
    BEST_SEGMENTOR_FILE,
    CEILING_FILE,
    ENCODER_FILE,
    FROZEN_FILE,
    SEGMENTOR_FILE,
    TEACHER_FILE,
    JobKind,
    validation_log,
)
from gkd.stages.context import (
    TRAIN_DATA,
    Run,
    files,
    student_segmentor,
    teacher_backbone,
    two_stage,
    validated_data,
    validator,
)

TRAINING = "head"  # the training phase: its checkpoint, logs and validation log


def stage_train_head(run: Run) -> None:
    """GKD stage 2: the student encoder frozen, a decoder trained with cross-entropy on source."""
    recipe = run.recipe
    segmentor = student_segmentor(run, encoder_file=run.file(ENCODER_FILE))
    objective = TaskObjective(segmentor, freeze_encoder=True)
    trainer = run.trainer(TRAINING, objective, run.dataset(recipe.data.source, train=True), recipe.head)
    trainer.fit(validator(run, segmentor, objective, TRAINING, recipe.head, keep_best=True))
    if run.info.is_main:
        save_segmentor(
            run.file(SEGMENTOR_FILE), segmentor, recipe.models.student, recipe.models.decoder, run.num_classes
        )


STAGE = Stage(
    "train-head",
    stage_train_head,
    files(SEGMENTOR_FILE),
    needed=two_stage,
    distributed=True,
    inputs=files(ENCODER_FILE),
    data=lambda r: validated_data(r, r.head),
    trainings=lambda r: [TrainingUse(TRAINING, r.head, "source")],
    sections=(*TRAIN_DATA, "models.student", "models.decoder", "head"),
    weights=("student",),
    side_outputs=(BEST_SEGMENTOR_FILE, validation_log(TRAINING)),
)


def _train_frozen_encoder_head(run: Run, encoder_from: str) -> None:
    """A fresh decoder on a frozen encoder, trained exactly like GKD's stage 2 (the ``head`` schedule).

    ``encoder_from="student"``: the student's own initial encoder (its recipe weights): the authors' no-KD row,
    a frozen ImageNet DeiT with the same head schedule as GKD. ``"teacher"``: the teacher's encoder, the
    ceiling GKD would reach if distillation were perfect.
    """
    recipe = run.recipe
    if encoder_from == "teacher":
        model, file = recipe.models.teacher, CEILING_FILE
        encoder = teacher_backbone(run)
        torch.manual_seed(recipe.seed + 2)
        decoder, layers = build_decoder(recipe.models.decoder, encoder.embed_dim, encoder.depth, run.num_classes)
        segmentor = Segmentor(encoder, decoder, layers).to(run.device)
    else:
        model, file = recipe.models.student, FROZEN_FILE
        segmentor = student_segmentor(run)
    objective = TaskObjective(segmentor, freeze_encoder=True)
    name = JobKind.CEILING.value if encoder_from == "teacher" else JobKind.FROZEN.value
    trainer = run.trainer(name, objective, run.dataset(recipe.data.source, train=True), recipe.head)
    trainer.fit(validator(run, segmentor, objective, name, recipe.head))
    if run.info.is_main:
        save_segmentor(run.file(file), segmentor, model, recipe.models.decoder, run.num_classes)


def stage_train_frozen_head(run: Run) -> None:
    """The student's own initial encoder frozen, a decoder trained with GKD's stage-2 schedule (no-KD row)."""
    _train_frozen_encoder_head(run, "student")


def stage_train_ceiling_head(run: Run) -> None:
    """The teacher's encoder frozen, a student decoder trained with GKD's stage-2 schedule (the ceiling)."""
    _train_frozen_encoder_head(run, "teacher")


def _teacher_input(recipe) -> tuple[str, ...]:
    return (TEACHER_FILE,) if recipe.models.teacher.train_encoder else ()


_HEAD_SECTIONS = (*TRAIN_DATA, "models.decoder", "head")
FROZEN_STAGE = Stage(
    "train-frozen-head",
    stage_train_frozen_head,
    files(FROZEN_FILE),
    needed=lambda r: r.head is not None,
    distributed=True,
    data=lambda r: validated_data(r, r.head),
    trainings=lambda r: [TrainingUse(JobKind.FROZEN.value, r.head, "source")],
    sections=(*_HEAD_SECTIONS, "models.student"),
    weights=("student",),
    side_outputs=(validation_log(JobKind.FROZEN.value),),
    on_request=True,
)
CEILING_STAGE = Stage(
    "train-ceiling-head",
    stage_train_ceiling_head,
    files(CEILING_FILE),
    needed=lambda r: r.head is not None,
    distributed=True,
    inputs=_teacher_input,
    data=lambda r: validated_data(r, r.head),
    trainings=lambda r: [TrainingUse(JobKind.CEILING.value, r.head, "source")],
    sections=(*_HEAD_SECTIONS, "models.teacher"),
    weights=("teacher",),
    side_outputs=(validation_log(JobKind.CEILING.value),),
    on_request=True,
)
