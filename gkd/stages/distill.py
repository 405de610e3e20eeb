"""Stage ``distill``, GKD's stage 1: the student encoder distilled from the frozen teacher, in the phases of
`PHASES` (1a task-agnostic on proxy images, 1b domain-agnostic on source images), or in one joint stage
(task loss plus distillation loss) as the conventional baselines do. Each phase may read the teacher's
outputs from a cache (``distill.teacher_cache``) instead of running the teacher.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gkd.compress.losses import build_loss, loss_needs
from gkd.compress.objectives import DistillObjective, JointObjective
from gkd.compress.teacher_cache import TeacherViews, cache_key, open_or_build
from gkd.distill_phases import JOINT, PHASES, Phase
from gkd.engine import HASHES_FILE, RECORDS_DIR, FileHashes, Stage
from gkd.models.checkpoint import save_segmentor
from gkd.models.zoo import with_patch_size
from gkd.preflight import DataUse, TrainingUse
from gkd.recipe import Recipe
from gkd.rundir import ENCODER_FILE, SEGMENTOR_FILE, TEACHER_FILE, validation_log
from gkd.stages.context import (
    TRAIN_DATA,
    Run,
    save_student_encoder,
    source_data,
    student_segmentor,
    teacher_backbone,
    teacher_segmentor,
    two_stage,
    validated_data,
    validator,
)
from gkd.utils.runtime import resolve_num_workers

log = logging.getLogger("gkd")


def stage_distill(run: Run) -> None:
    """Distil the student encoder: GKD stage 1 (or the baselines' one-stage joint schedule).

    Two-stage: 1a task-agnostic on proxy images, 1b domain-agnostic on source images. One-stage: task loss
    plus distillation loss, jointly, as the conventional baselines do."""
    if not two_stage(run.recipe):
        _distill_jointly(run)
        return
    # 1a then 1b, each a new distillation model as in the GKD code: fresh loss heads (projectors, mask token),
    # only the student carried over; 1a may run both networks at another patch size (the code: 14 on 224 crops).
    recipe, distill = run.recipe, run.recipe.distill
    student = student_segmentor(run)
    encoder = student.encoder
    for index, phase in enumerate(PHASES):
        config = phase.config(recipe)
        if config is None:
            continue
        patch_size = phase.patch_size_of(recipe)
        teacher = teacher_backbone(run, patch_size)
        encoder = with_patch_size(encoder, patch_size or student.encoder.patch_size)
        torch.manual_seed(recipe.seed + 3 + index)
        options = distill.loss.options
        loss = build_loss(distill.loss.name, options, encoder.embed_dim, teacher.embed_dim, run.num_classes)
        objective = DistillObjective(encoder, loss, teacher, run.teacher_dtype)
        images, transform = phase.dataset(recipe), phase.transform_config(recipe)
        dataset = run.dataset(images, train=True, labeled=False, imagenet_transform=transform)
        if distill.teacher_cache is not None:
            dataset = teacher_views(run, phase.name, objective, dataset)
        run.trainer(phase.name, objective, dataset, config).fit()
        del teacher, objective
    if run.info.is_main:
        save_student_encoder(run, with_patch_size(encoder, student.encoder.patch_size))


def _distill_jointly(run: Run) -> None:
    """The one-stage schedule: the student segmentor trained on task loss plus distillation loss."""
    recipe, distill = run.recipe, run.recipe.distill
    student = student_segmentor(run)
    if not loss_needs(distill.loss.name).teacher_segmentor:
        teacher = teacher_backbone(run)
        teacher_dim = teacher.embed_dim
    else:
        teacher = teacher_segmentor(run, trained=True)
        teacher_dim = teacher.encoder.embed_dim
    loss = build_loss(distill.loss.name, distill.loss.options, student.encoder.embed_dim, teacher_dim, run.num_classes)
    objective = JointObjective(student, loss, teacher, distill.distill_weight, run.teacher_dtype)
    trainer = run.trainer(JOINT, objective, run.dataset(recipe.data.source, train=True), distill.joint)
    trainer.fit(validator(run, student, objective, JOINT, distill.joint))
    if run.info.is_main:
        save_segmentor(run.file(SEGMENTOR_FILE), student, recipe.models.student, recipe.models.decoder, run.num_classes)
        save_student_encoder(run, student.encoder)


def teacher_cache_specs(run: Run, hashes: FileHashes) -> dict[str, dict]:
    """What the teacher cache of each stage-1 phase depends on, by phase (empty without ``distill.teacher_cache``):
    the teacher's weights (by content) and settings, the layers the loss reads, the images, their transform,
    ``K`` and the dtype; methods that differ in anything else (loss terms, steps, seeds, the student) share it."""
    recipe, distill = run.recipe, run.recipe.distill
    if distill.teacher_cache is None or not two_stage(recipe):
        return {}
    teacher = recipe.models.teacher
    weights = run.file(TEACHER_FILE) if teacher.train_encoder else Path(teacher.weights)
    common = {
        "teacher": {
            **teacher.model_dump(mode="json", exclude={"weights"}),
            "weights_sha256": hashes(weights),
            "dtype": recipe.training.teacher_dtype,
        },
        "teacher_layers": distill.loss.options.get("teacher_layers"),
        "img_size": list(recipe.data.img_size),
        "views": distill.teacher_cache.views,
        "dtype": distill.teacher_cache.dtype,
    }
    specs = {}
    for phase in PHASES:
        if phase.config(recipe) is None:
            continue
        images, transform = phase.dataset(recipe), phase.transform_config(recipe)
        sources = [images] + (recipe.data.extra_sources if images == recipe.data.source else [])
        specs[phase.name] = {
            **common,
            "patch_size": phase.patch_size_of(recipe),
            "images": [source.model_dump(mode="json") for source in sources],
            "transform": (transform or recipe.data.train_transform).model_dump(mode="json"),
        }
    return specs


def teacher_cache_keys(run: Run, hashes: FileHashes) -> dict[str, str]:
    """`cache_key` of each stage-1 phase's teacher cache (recorded with the stage: a new teacher, new key)."""
    return {name: cache_key(spec) for name, spec in teacher_cache_specs(run, hashes).items()}


def teacher_views(run: Run, phase: str, objective: DistillObjective, dataset) -> TeacherViews:
    """``dataset`` as the cached views of ``phase`` (`TeacherViews`), the cache built first where it is missing or
    incomplete (rank 0 builds, the other ranks wait, then open it)."""
    settings = run.recipe.distill.teacher_cache
    hashes = FileHashes(run.file(RECORDS_DIR) / HASHES_FILE)
    spec = teacher_cache_specs(run, hashes)[phase]
    directory = run.teacher_cache_root / cache_key(spec)

    def open_cache():
        return open_or_build(
            directory,
            spec,
            dataset,
            objective.teacher_outputs,
            settings.views,
            settings.dtype,
            run.device,
            settings.batch_size,
            settings.views_per_shard,
            resolve_num_workers(run.recipe.training.num_workers, run.device),
        )

    cache = open_cache() if run.info.is_main else None
    run.barrier(f"have rank 0 build or check the teacher cache of {phase} in {directory}")
    cache = cache or open_cache()
    log.info("%s: teacher outputs of %d views per image read from %s", phase, settings.views, directory)
    return TeacherViews(dataset, settings.views, cache)


def distill_inputs(recipe: Recipe) -> tuple[str, ...]:
    """The teacher stage's file when distillation reads it (a trained teacher encoder, or a loss on its head)."""
    teacher_head = recipe.distill.schedule == "one_stage" and loss_needs(recipe.distill.loss.name).teacher_segmentor
    return (TEACHER_FILE,) if recipe.models.teacher.train_encoder or teacher_head else ()


def _phase_data(recipe: Recipe, phase: Phase) -> list[DataUse]:
    """The unlabelled images of a phase: every source set for the source, else its own split where it has one."""
    if phase.images == "source":
        return source_data(recipe, labeled=False)
    images = phase.dataset(recipe)
    return [DataUse(phase.images, images, False)] if images else []


def _data(recipe: Recipe) -> list[DataUse]:
    if not two_stage(recipe):
        return validated_data(recipe, recipe.distill.joint)
    return [use for phase in PHASES if phase.config(recipe) for use in _phase_data(recipe, phase)]


def _trainings(recipe: Recipe) -> list[TrainingUse]:
    if not two_stage(recipe):
        return [TrainingUse(JOINT, recipe.distill.joint, "source", ("student",), ("teacher encoder",))]
    phases = [(phase, phase.config(recipe)) for phase in PHASES]
    return [
        TrainingUse(phase.name, config, phase.images, ("student encoder",), ("teacher encoder",))
        for phase, config in phases
        if config is not None
    ]


_PHASE_SECTIONS = tuple(  # the data fields of the phases (images, transforms) that TRAIN_DATA does not name
    section
    for phase in PHASES
    for section in (f"data.{phase.images}", f"data.{phase.transform}")
    if section not in TRAIN_DATA
)

STAGE = Stage(
    "distill",
    stage_distill,
    lambda r: (ENCODER_FILE,) if two_stage(r) else (ENCODER_FILE, SEGMENTOR_FILE),
    distributed=True,
    inputs=distill_inputs,
    data=_data,
    trainings=_trainings,
    sections=(*TRAIN_DATA, "models", *_PHASE_SECTIONS, "distill"),
    weights=("teacher", "student"),
    side_outputs=(validation_log(JOINT),),
    caches=teacher_cache_keys,
)
