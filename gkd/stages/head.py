"""Stage ``train-head``, GKD's stage 2: a decoder on the frozen distilled encoder; and the same schedule on
other frozen encoders, the on-request stages ``train-frozen-head`` (the student's own encoder: the authors'
no-KD row) and ``train-ceiling-head`` (the teacher's encoder: what perfect distillation reaches)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gkd.compress.objectives import TaskObjective
from gkd.engine import Stage
from gkd.models.checkpoint import save_segmentor
from gkd.models.decoders import build_decoder
from gkd.models.segmentor import Segmentor
from gkd.preflight import Part
from gkd.rundir import (
    BEST_SEGMENTOR_FILE,
    ENCODER_FILE,
    MODEL_FILES,
    SEGMENTOR_FILE,
    TEACHER_FILE,
    JobKind,
)
from gkd.stages.context import (
    Run,
    files,
    student_segmentor,
    supervised_stage,
    teacher_backbone,
    two_stage,
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


STAGE = supervised_stage(
    "train-head",
    stage_train_head,
    SEGMENTOR_FILE,
    TRAINING,
    lambda r: r.head,
    ("models.student", "models.decoder", "head"),
    weights=("student",),
    needed=two_stage,
    parts=lambda r: (("student head",), ("student encoder",)),
    inputs=files(ENCODER_FILE),
    side_outputs=(BEST_SEGMENTOR_FILE,),
)


def _train_frozen_encoder_head(run: Run, kind: JobKind) -> None:
    """A fresh decoder on a frozen encoder, trained exactly like GKD's stage 2 (the ``head`` schedule), as the
    phase and into the segmentor file of ``kind``.

    `JobKind.FROZEN`: the student's own initial encoder (its recipe weights): the authors' no-KD row, a frozen
    ImageNet DeiT with the same head schedule as GKD. `JobKind.CEILING`: the teacher's encoder, the ceiling GKD
    would reach if distillation were perfect.
    """
    recipe = run.recipe
    if kind is JobKind.CEILING:
        model = recipe.models.teacher
        encoder = teacher_backbone(run)
        torch.manual_seed(recipe.seed + 2)
        decoder, layers = build_decoder(recipe.models.decoder, encoder.embed_dim, encoder.depth, run.num_classes)
        segmentor = Segmentor(encoder, decoder, layers).to(run.device)
    else:
        model = recipe.models.student
        segmentor = student_segmentor(run)
    objective = TaskObjective(segmentor, freeze_encoder=True)
    trainer = run.trainer(kind.value, objective, run.dataset(recipe.data.source, train=True), recipe.head)
    trainer.fit(validator(run, segmentor, objective, kind.value, recipe.head))
    if run.info.is_main:
        save_segmentor(run.file(MODEL_FILES[kind]), segmentor, model, recipe.models.decoder, run.num_classes)


def stage_train_frozen_head(run: Run) -> None:
    """The student's own initial encoder frozen, a decoder trained with GKD's stage-2 schedule (no-KD row)."""
    _train_frozen_encoder_head(run, JobKind.FROZEN)


def stage_train_ceiling_head(run: Run) -> None:
    """The teacher's encoder frozen, a student decoder trained with GKD's stage-2 schedule (the ceiling)."""
    _train_frozen_encoder_head(run, JobKind.CEILING)


def _teacher_input(recipe) -> tuple[str, ...]:
    return (TEACHER_FILE,) if recipe.models.teacher.train_encoder else ()


def _frozen_encoder_stage(name: str, run: Callable[[Run], None], kind: JobKind, **options: Any) -> Stage:
    """An on-request stage training a decoder under the ``head`` schedule on the frozen encoder ``kind`` names
    (the teacher's for `JobKind.CEILING`, else the student's); its phase and segmentor file are ``kind``'s."""
    encoder_from = "teacher" if kind is JobKind.CEILING else "student"
    sections = ("models.decoder", "head", f"models.{encoder_from}")
    output = MODEL_FILES[kind]
    frozen: Part = "teacher encoder" if kind is JobKind.CEILING else "student encoder"
    return supervised_stage(
        name, run, output, kind.value, lambda r: r.head, sections, (encoder_from,), on_request=True,
        parts=lambda r: (("student head",), (frozen,)), **options,
    )  # fmt: skip


FROZEN_STAGE = _frozen_encoder_stage("train-frozen-head", stage_train_frozen_head, JobKind.FROZEN)
CEILING_STAGE = _frozen_encoder_stage(
    "train-ceiling-head", stage_train_ceiling_head, JobKind.CEILING, inputs=_teacher_input
)
