"""The stages of a run and their files in the run directory.

Data flows recipe -> models + data -> compress -> evaluate -> export -> benchmark -> report; each stage
reads the previous stages' files, so any one can be re-run alone. Each output is written atomically.

The run directory works like a build: ``stages/<stage>.json`` records what a stage consumed (hashes of its
recipe sections, of the run-directory files and weights it read, fingerprints of its data). ``run`` skips
a stage only when its outputs exist and nothing it consumed has changed; a changed input reruns it from
scratch and, through its new outputs, everything downstream. An interrupted training stage resumes from
its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from gkd.compress.losses import build_loss, loss_needs
from gkd.compress.objectives import DistillObjective, JointObjective, TaskObjective
from gkd.compress.teacher_cache import TeacherViews, cache_key, open_or_build
from gkd.compress.trainer import Trainer, fingerprint
from gkd.data.config import DatasetConfig, build_dataset, dataset_info
from gkd.data.transforms import (
    ImageNetTransformConfig,
    build_eval_transform,
    build_imagenet_transform,
    build_train_transform,
)
from gkd.evaluate.fidelity import DomainTokens, encode, evenly_spaced, fidelity_per_domain
from gkd.evaluate.inference import evaluate_predictor, torch_predictor
from gkd.export.stage import benchmark_artifacts, export_artifacts
from gkd.models.backbone import Backbone
from gkd.models.checkpoint import build_segmentor, load_encoder, load_segmentor, save_encoder, save_segmentor
from gkd.models.decoders import build_decoder
from gkd.models.segmentor import Segmentor
from gkd.models.weights import check_fit
from gkd.models.zoo import create_backbone_from_config, with_patch_size
from gkd.preflight import CHECKS_DIR, CheckResult, DataUse, TrainingUse, preflight
from gkd.recipe import OptimConfig, Recipe, results_settings
from gkd.rundir import (
    BENCHMARK_FILE,
    BEST_SEGMENTOR_FILE,
    CEILING_FILE,
    ENCODER_FILE,
    EVAL_FILE,
    EXPORT_FILE,
    FROZEN_FILE,
    MODEL_CARD_FILE,
    NO_KD_FILE,
    REPORT_JSON_FILE,
    REPORT_MD_FILE,
    SEGMENTOR_FILE,
    SOURCE_DOMAIN,
    SOURCE_SELECTION_FILE,
    TEACHER_CACHE_DIR,
    TEACHER_FILE,
    validation_log,
)
from gkd.utils.io import atomic_path, file_sha256, read_json, read_jsonl, require_free_space, write_json
from gkd.utils.runtime import DistInfo, barrier, resolve_num_workers

log = logging.getLogger("gkd")

RECORDS_DIR = "stages"  # stages/<stage>.json: what each stage consumed; stages/file_hashes.json
HASHES_FILE = "file_hashes.json"


@dataclass
class Run:
    """One run directory, its recipe and where it executes."""

    recipe: Recipe
    dir: Path
    device: torch.device
    info: DistInfo
    fingerprints: dict[str, str] = field(default_factory=dict)  # data role -> fingerprint (pre-flight check)
    teacher_caches: Path | None = None  # where teacher caches live (compare: shared by its jobs); None = in the run

    @property
    def teacher_cache_root(self) -> Path:
        return self.teacher_caches or self.dir / TEACHER_CACHE_DIR

    def file(self, name: str) -> Path:
        return self.dir / name

    @property
    def num_classes(self) -> int:
        return dataset_info(self.recipe.data.source.name)[0]

    @property
    def class_names(self) -> list[str]:
        return list(dataset_info(self.recipe.data.source.name)[1])

    @property
    def teacher_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.recipe.training.teacher_dtype
        ]

    def dataset(
        self,
        config: DatasetConfig,
        train: bool,
        labeled: bool = True,
        for_teacher: bool = False,
        imagenet_transform: ImageNetTransformConfig | None = None,
    ):
        """A split with the recipe's training or evaluation transform (the source with every extra source).

        Args:
            config: the split.
            train: the training transform (else the evaluation one).
            labeled: read labels.
            for_teacher: the teacher's training transform where the recipe has one.
            imagenet_transform: timm's ImageNet transform instead of the training one (distillation, images only).
        """
        data = self.recipe.data
        train_transform = (data.teacher_transform if for_teacher else None) or data.train_transform
        if train and imagenet_transform is not None:
            transform = build_imagenet_transform(imagenet_transform)
        elif train:
            transform = build_train_transform(train_transform)
        else:
            transform = build_eval_transform(data.eval_transform)
        dataset = build_dataset(config, transform=transform, labeled=labeled)
        if config == data.source and self.info.is_main and not self.file(SOURCE_SELECTION_FILE).is_file():
            dataset.save_fraction_indices(self.file(SOURCE_SELECTION_FILE))  # which labeled samples were used
        if config == data.source and data.extra_sources:  # multi-source: every source set, concatenated
            extras = [build_dataset(extra, transform=transform, labeled=labeled) for extra in data.extra_sources]
            return ConcatDataset([dataset, *extras])
        return dataset

    def trainer(self, name: str, objective: torch.nn.Module, dataset, config: OptimConfig) -> Trainer:
        """A `Trainer` in this run directory, its checkpoint tied to every recipe section the stage depends on.

        Args:
            name: the training phase (names its checkpoint and log).
            objective: what is trained (moved to the run's device).
            dataset: its samples.
            config: its optimisation settings.
        """
        recipe = self.recipe
        if self.info.is_main:  # the checkpoint (state + AdamW moments) may exist twice while it is replaced
            state = sum(t.numel() * t.element_size() for t in objective.state_dict().values())
            moments = sum(2 * p.numel() * p.element_size() for p in objective.parameters() if p.requires_grad)
            require_free_space(self.file("checkpoints"), 2 * (state + moments) + 16 * 2**20, f"training {name}")
        settings = fingerprint(
            name,
            recipe.seed,
            self.info.world_size,
            config.model_dump(mode="json"),
            recipe.models.model_dump(mode="json"),
            recipe.data.model_dump(mode="json"),
            recipe.distill.loss.model_dump(mode="json"),
            recipe.training.model_dump(mode="json"),
        )
        return Trainer(
            name=name,
            objective=objective.to(self.device),
            dataset=dataset,
            config=config,
            training=recipe.training,
            run_dir=self.dir,
            device=self.device,
            info=self.info,
            seed=recipe.seed,
            settings_fingerprint=settings,
        )


# -- models --------------------------------------------------------------------------------------------
def teacher_segmentor(run: Run, trained: bool) -> Segmentor:
    """The teacher with its head; ``trained`` loads the teacher stage's file."""
    models = run.recipe.models
    if trained:
        return load_segmentor(run.file(TEACHER_FILE))[0].to(run.device)
    torch.manual_seed(run.recipe.seed + 1)
    return build_segmentor(models.teacher, models.teacher_decoder or models.decoder, run.num_classes).to(run.device)


def teacher_backbone(run: Run, patch_size: int | None = None) -> Backbone:
    """The frozen teacher encoder: the recipe's weights, or the teacher stage's encoder when it trained one;
    ``patch_size`` overrides the recipe's (weights converted from the checkpoint)."""
    config = run.recipe.models.teacher
    if config.train_encoder:
        encoder = teacher_segmentor(run, trained=True).encoder
        return encoder if patch_size is None else with_patch_size(encoder, patch_size)
    if patch_size is not None:
        config = config.model_copy(update={"patch_size": patch_size})
    return create_backbone_from_config(config).to(run.device)


def student_segmentor(run: Run, encoder_file: Path | None = None) -> Segmentor:
    """The student with a new head; every method starts from the same seeded initialisation. ``encoder_file``
    (a `save_encoder` file, checked against the recipe's student) replaces the fresh encoder."""
    torch.manual_seed(run.recipe.seed + 2)
    segmentor = build_segmentor(run.recipe.models.student, run.recipe.models.decoder, run.num_classes)
    if encoder_file is not None:
        encoder = load_encoder(encoder_file)
        check_fit(segmentor.encoder.model, encoder.model.state_dict(), encoder_file)
        segmentor.encoder = encoder
    return segmentor.to(run.device)


def save_student_encoder(run: Run, encoder: Backbone) -> None:
    """The distilled student encoder: a plain timm state dict that ``timm.create_model`` takes back."""
    save_encoder(encoder, run.file(ENCODER_FILE), {"model": run.recipe.models.student.model_dump(mode="json")})


# -- stages --------------------------------------------------------------------------------------------
def stage_train_teacher(run: Run) -> None:
    """The teacher's head (and encoder, for recipes without VFM weights) trained on labeled source."""
    recipe = run.recipe
    segmentor = teacher_segmentor(run, trained=False)
    objective = TaskObjective(segmentor, freeze_encoder=not recipe.models.teacher.train_encoder)
    source = run.dataset(recipe.data.source, train=True, for_teacher=True)
    config = recipe.teacher_training
    run.trainer("teacher", objective, source, config).fit(validator(run, segmentor, objective, "teacher", config))
    if run.info.is_main:
        save_segmentor(
            run.file(TEACHER_FILE),
            segmentor,
            recipe.models.teacher,
            recipe.models.teacher_decoder or recipe.models.decoder,
            run.num_classes,
        )


def stage_distill(run: Run) -> None:
    """Distil the student encoder: GKD stage 1 (or the baselines' one-stage joint schedule).

    Two-stage: 1a task-agnostic on proxy images, 1b domain-agnostic on source images. One-stage: task loss
    plus distillation loss, jointly, as the conventional baselines do."""
    recipe, distill = run.recipe, run.recipe.distill
    student = student_segmentor(run)
    if distill.schedule == "one_stage":
        if not loss_needs(distill.loss.name).teacher_segmentor:
            teacher = teacher_backbone(run)
            teacher_dim = teacher.embed_dim
        else:
            teacher = teacher_segmentor(run, trained=True)
            teacher_dim = teacher.encoder.embed_dim
        loss = build_loss(
            distill.loss.name, distill.loss.options, student.encoder.embed_dim, teacher_dim, run.num_classes
        )
        objective = JointObjective(student, loss, teacher, distill.distill_weight, run.teacher_dtype)
        trainer = run.trainer("distill_joint", objective, run.dataset(recipe.data.source, train=True), distill.joint)
        trainer.fit(validator(run, student, objective, "distill_joint", distill.joint))
        if run.info.is_main:
            save_segmentor(
                run.file(SEGMENTOR_FILE), student, recipe.models.student, recipe.models.decoder, run.num_classes
            )
            save_student_encoder(run, student.encoder)
        return
    # 1a then 1b, each a new distillation model as in the GKD code: fresh loss heads (projectors, mask token),
    # only the student carried over; 1a may run both networks at another patch size (the code: 14 on 224 crops).
    encoder = student.encoder
    for index, (name, config, images, transform) in enumerate(_distill_phases(recipe)):
        if config is None:
            continue
        patch_size = distill.task_agnostic_patch_size if index == 0 else None
        teacher = teacher_backbone(run, patch_size)
        encoder = with_patch_size(encoder, patch_size or student.encoder.patch_size)
        torch.manual_seed(recipe.seed + 3 + index)
        options = distill.loss.options
        loss = build_loss(distill.loss.name, options, encoder.embed_dim, teacher.embed_dim, run.num_classes)
        objective = DistillObjective(encoder, loss, teacher, run.teacher_dtype)
        dataset = run.dataset(images, train=True, labeled=False, imagenet_transform=transform)
        if distill.teacher_cache is not None:
            dataset = teacher_views(run, name, objective, dataset)
        run.trainer(name, objective, dataset, config).fit()
        del teacher, objective
    if run.info.is_main:
        save_student_encoder(run, with_patch_size(encoder, student.encoder.patch_size))


def _distill_phases(
    recipe: Recipe,
) -> list[tuple[str, OptimConfig | None, DatasetConfig | None, ImageNetTransformConfig | None]]:
    """Stage 1's phases: name, settings, images and ImageNet transform (None = the training transform)."""
    data, distill = recipe.data, recipe.distill
    return [
        ("distill_task_agnostic", distill.task_agnostic, data.proxy, data.proxy_transform),
        ("distill_domain_agnostic", distill.domain_agnostic, data.source, data.distill_transform),
    ]


def teacher_cache_specs(run: Run, hashes: FileHashes) -> dict[str, dict]:
    """What the teacher cache of each stage-1 phase depends on, by phase (empty without ``distill.teacher_cache``):
    the teacher's weights (by content) and settings, the layers the loss reads, the images, their transform,
    ``K`` and the dtype; methods that differ in anything else (loss terms, steps, seeds, the student) share it."""
    recipe, distill = run.recipe, run.recipe.distill
    if distill.teacher_cache is None or not _two_stage(recipe):
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
    for index, (name, config, images, transform) in enumerate(_distill_phases(recipe)):
        if config is None:
            continue
        sources = [images] + (recipe.data.extra_sources if images == recipe.data.source else [])
        specs[name] = {
            **common,
            "patch_size": distill.task_agnostic_patch_size if index == 0 else None,
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
    barrier(run.info, f"have rank 0 build or check the teacher cache of {phase} in {directory}")
    cache = cache or open_cache()
    log.info("%s: teacher outputs of %d views per image read from %s", phase, settings.views, directory)
    return TeacherViews(dataset, settings.views, cache)


def validator(
    run: Run, segmentor: Segmentor, objective: torch.nn.Module, stage: str, config: OptimConfig, keep_best: bool = False
) -> Callable[[int], None] | None:
    """``on_step`` that, every ``config.validate_every`` steps and at the last, appends every domain's mIoU to
    `validation_log` (``None`` when validation is off); a step already logged (a resumed stage) is skipped.

    Args:
        run: the run (its evaluation domains and run directory).
        segmentor: the model being trained; evaluated in eval mode, ``objective`` put back in train mode.
        objective: the trained module holding ``segmentor``.
        stage: the trainer's name, which names the log (``teacher``, ``no_kd``, ``distill_joint``, ``head``).
        config: the stage's optimisation settings (``validate_every``, ``steps``).
        keep_best: also save the segmentor with the best mean target mIoU so far as `BEST_SEGMENTOR_FILE`. The
            GKD code validates on the target sets every 4,000 iterations (mmseg ``val_interval``); a best
            checkpoint chosen that way has seen the targets' labels, so the last checkpoint stays the headline row.
    """
    every = config.validate_every
    if every is None:
        return None
    recipe, log = run.recipe, run.file(validation_log(stage))
    evaluate = make_domain_evaluator(run)

    def on_step(step: int) -> None:
        if not run.info.is_main or (step % every and step != config.steps):
            return
        history = [entry for _, entry in read_jsonl(log)] if log.is_file() else []
        if any(entry["step"] == step for entry in history):
            return
        domains = {name: metrics["miou"] for name, metrics in evaluate(torch_predictor(segmentor, run.device)).items()}
        targets = [miou for name, miou in domains.items() if name != SOURCE_DOMAIN]
        entry = {"step": step, "miou": domains, "mean_target_miou": sum(targets) / len(targets)}
        if keep_best and all(entry["mean_target_miou"] > old["mean_target_miou"] for old in history):
            save_segmentor(
                run.file(BEST_SEGMENTOR_FILE), segmentor, recipe.models.student, recipe.models.decoder, run.num_classes
            )
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as file:
            file.write(json.dumps(entry) + "\n")
        objective.train()

    return on_step


def stage_train_head(run: Run) -> None:
    """GKD stage 2: the student encoder frozen, a decoder trained with cross-entropy on source."""
    recipe = run.recipe
    segmentor = student_segmentor(run, encoder_file=run.file(ENCODER_FILE))
    objective = TaskObjective(segmentor, freeze_encoder=True)
    trainer = run.trainer("head", objective, run.dataset(recipe.data.source, train=True), recipe.head)
    trainer.fit(validator(run, segmentor, objective, "head", recipe.head, keep_best=True))
    if run.info.is_main:
        save_segmentor(
            run.file(SEGMENTOR_FILE), segmentor, recipe.models.student, recipe.models.decoder, run.num_classes
        )


def stage_train_no_kd(run: Run) -> None:
    """Reference: the same student fine-tuned end to end on source, without distillation."""
    recipe = run.recipe
    segmentor = student_segmentor(run)
    objective = TaskObjective(segmentor, freeze_encoder=False)
    config = recipe.compare.no_kd
    trainer = run.trainer("no_kd", objective, run.dataset(recipe.data.source, train=True), config)
    trainer.fit(validator(run, segmentor, objective, "no_kd", config))
    if run.info.is_main:
        save_segmentor(run.file(NO_KD_FILE), segmentor, recipe.models.student, recipe.models.decoder, run.num_classes)


def train_frozen_encoder_head(run: Run, encoder_from: str) -> None:
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
    name = "ceiling" if encoder_from == "teacher" else "frozen"
    trainer = run.trainer(name, objective, run.dataset(recipe.data.source, train=True), recipe.head)
    trainer.fit(validator(run, segmentor, objective, name, recipe.head))
    if run.info.is_main:
        save_segmentor(run.file(file), segmentor, model, recipe.models.decoder, run.num_classes)


FIDELITY_IMAGES = 48  # images per domain for the fidelity probes (x tokens per image: plenty for a linear fit)
FIDELITY_FIT = "fit"  # the source training images the probes are fitted on


def _fidelity_sets(run: Run) -> dict[str, tuple[object, list[int]]]:
    """``{name: (dataset, indices)}``: the source training split (the fit), every evaluated domain, the proxy."""
    data = run.recipe.data
    configs = {FIDELITY_FIT: (data.source, True), **{d: (c, True) for d, c in evaluation_domains(run).items()}}
    if data.proxy is not None:
        configs["proxy"] = (data.proxy, False)  # R² only: a proxy set has no segmentation labels
    sets = {}
    for name, (config, labeled) in configs.items():
        dataset = build_dataset(config, transform=build_eval_transform(data.eval_transform), labeled=labeled)
        count = 2 * FIDELITY_IMAGES if name == FIDELITY_FIT else FIDELITY_IMAGES
        sets[name] = (dataset, evenly_spaced(len(dataset), count))
    return sets


def teacher_fidelity_tokens(run: Run, path: Path) -> dict[str, DomainTokens]:
    """The teacher's tokens on the fidelity images, computed once and kept in ``path`` (every student of a
    comparison is probed against the same teacher tokens)."""
    if path.is_file():
        return torch.load(path, weights_only=False)
    teacher = teacher_backbone(run)
    tokens = {
        name: encode(teacher, dataset, indices, run.num_classes, run.device, grid=student_grid(run))
        for name, (dataset, indices) in _fidelity_sets(run).items()
    }
    with atomic_path(path) as partial:
        torch.save(tokens, partial)
    return tokens


def student_grid(run: Run) -> tuple[int, int]:
    """The student's token grid at the recipe's input size."""
    with torch.device("meta"):
        encoder = create_backbone_from_config(run.recipe.models.student.model_copy(update={"weights": None}))
    return encoder.grid_size(*run.recipe.data.img_size)


def encoder_fidelity(run: Run, encoder: Backbone, teacher_tokens: dict[str, DomainTokens]) -> dict[str, dict]:
    """`gkd.evaluate.fidelity` of ``encoder`` against the teacher on every domain (and the proxy)."""
    own = {
        name: encode(encoder, dataset, indices, run.num_classes, run.device)
        for name, (dataset, indices) in _fidelity_sets(run).items()
    }
    fit = own.pop(FIDELITY_FIT)
    domains = {name: (tokens, teacher_tokens[name]) for name, tokens in own.items()}
    return fidelity_per_domain(domains, fit, teacher_tokens[FIDELITY_FIT], run.num_classes)


def evaluation_domains(run: Run) -> dict[str, DatasetConfig]:
    """``source`` (held-out source split) first, then every target domain."""
    return {SOURCE_DOMAIN: run.recipe.data.source_val, **run.recipe.data.targets}


def make_domain_evaluator(run: Run) -> Callable[[Callable], dict[str, dict]]:
    """``evaluate(predict) -> {domain: metrics}`` over every domain; datasets built once."""
    recipe = run.recipe
    datasets = {name: run.dataset(config, train=False) for name, config in evaluation_domains(run).items()}

    def evaluate(predict: Callable, label: str = "") -> dict[str, dict]:
        return {
            name: evaluate_predictor(
                predict,
                dataset,
                run.num_classes,
                recipe.data.img_size,
                recipe.evaluate.mode,
                recipe.evaluate.stride,
                recipe.evaluate.batch_size,
                description=f"{label} {name}".strip(),
                show_progress=run.info.is_main,
            )
            for name, dataset in datasets.items()
        }

    return evaluate


def evaluate_segmentors(run: Run, files: dict[str, str]) -> dict[str, dict]:
    """``{name: {params_m, encoder_params_m, domains: {domain: metrics}}}`` for each segmentor file of the
    run dir that exists (``files`` maps a model name to its file name)."""
    evaluate = make_domain_evaluator(run)
    results = {}
    for name, file in files.items():
        if run.file(file).is_file():
            segmentor = load_segmentor(run.file(file))[0].to(run.device)
            results[name] = {
                "params_m": sum(p.numel() for p in segmentor.parameters()) / 1e6,
                "encoder_params_m": sum(p.numel() for p in segmentor.encoder.parameters()) / 1e6,
                "domains": evaluate(torch_predictor(segmentor, run.device), name),
            }
    return results


def stage_evaluate(run: Run) -> None:
    """mIoU and per-class IoU of every trained model on the source split and each target domain."""
    files = {"teacher": TEACHER_FILE, "no_kd": NO_KD_FILE, "student": SEGMENTOR_FILE}
    results = evaluate_segmentors(run, {**files, "student_best": BEST_SEGMENTOR_FILE})
    write_json(run.file(EVAL_FILE), {"class_names": run.class_names, "models": results})


def _images(run: Run, config: DatasetConfig, count: int, seed: int) -> torch.Tensor:
    """``count`` images of a split, resized to the input size (calibration and parity inputs)."""
    dataset = run.dataset(config, train=False)
    picks = np.random.default_rng(seed).permutation(len(dataset))[:count]
    size = run.recipe.data.img_size
    return torch.stack(
        [
            F.interpolate(dataset[int(i)]["image"][None], size=size, mode="bilinear", align_corners=False)[0]
            for i in picks
        ]
    )


def stage_export(run: Run) -> None:
    """ONNX (fp32 / fp16 / int8 QDQ), TensorRT engines where possible, AOTInductor; parity checked."""
    recipe = run.recipe
    # ONNX fp32/fp16/int8, the AOTInductor package and engines: a few copies of the weights at most
    require_free_space(run.dir, 6 * run.file(SEGMENTOR_FILE).stat().st_size + 64 * 2**20, "export")
    segmentor = load_segmentor(run.file(SEGMENTOR_FILE))[0].to(run.device).eval()
    calibration = _images(run, recipe.data.source, recipe.export.source_images, recipe.seed)
    parity = _images(run, recipe.data.source_val, 4, recipe.seed + 1)
    summary = export_artifacts(segmentor, recipe.data.img_size, run.dir, recipe.export, calibration, parity, run.device)
    write_json(run.file(EXPORT_FILE), summary)


def stage_benchmark(run: Run) -> None:
    """Latency of every runtime x precision x batch size, and each artifact's mIoU on every domain."""
    recipe = run.recipe
    segmentor = load_segmentor(run.file(SEGMENTOR_FILE))[0].to(run.device).eval()
    evaluate_domains = make_domain_evaluator(run)

    def evaluate(predict_numpy: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
        def predict(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(predict_numpy(images.numpy().astype(np.float32))))

        return {name: metrics["miou"] for name, metrics in evaluate_domains(predict).items() if name != SOURCE_DOMAIN}

    summary = benchmark_artifacts(
        segmentor,
        recipe.data.img_size,
        run.dir,
        read_json(run.file(EXPORT_FILE)),
        recipe.benchmark,
        run.device,
        evaluate,
    )
    write_json(run.file(BENCHMARK_FILE), summary)


def stage_report(run: Run) -> None:
    """report.json, report.md and plots from the files the other stages wrote."""
    from gkd.report.report import write_report

    write_report(run.dir, run.recipe, run.class_names)


@dataclass(frozen=True)
class Stage:
    """A stage: what it runs, the files it writes and reads, and what else it consumes.

    ``inputs`` are files of earlier stages it cannot run without; ``reads`` every run-directory file it
    consumes when present (default: ``inputs``); ``side_outputs`` files it writes only in some recipes.
    ``data`` and ``trainings`` name the splits it reads and the training phases it runs (their checkpoints);
    ``sections`` the recipe keys (dotted) its results depend on.
    """

    name: str
    run: Callable[[Run], None]
    outputs: Callable[[Recipe], tuple[str, ...]]
    needed: Callable[[Recipe], bool] = lambda recipe: True
    distributed: bool = False  # runs on every rank (training) or on rank 0 only
    inputs: Callable[[Recipe], tuple[str, ...]] = lambda recipe: ()
    reads: Callable[[Recipe], tuple[str, ...]] | None = None
    data: Callable[[Recipe], list[DataUse]] = lambda recipe: []
    trainings: Callable[[Recipe], list[TrainingUse]] = lambda recipe: []
    sections: tuple[str, ...] = ("",)
    weights: tuple[str, ...] = ()  # model roles whose recipe weights it loads
    side_outputs: tuple[str, ...] = ()  # files it may also write (not needed for completeness); cleared on a redo
    caches: Callable[[Run, FileHashes], dict[str, str]] = lambda run, hashes: {}  # keys of the caches it reads

    def consumed_files(self, recipe: Recipe) -> tuple[str, ...]:
        return (self.reads or self.inputs)(recipe)

    def complete(self, run: Run) -> bool:
        return all(run.file(name).is_file() for name in self.outputs(run.recipe))

    def check_inputs(self, run: Run) -> None:
        """Files of earlier stages this one reads; a clear error naming the stage that writes each."""
        for name in self.inputs(run.recipe):
            if not run.file(name).is_file():
                writer = next(s.name for s in STAGES if name in s.outputs(run.recipe))
                raise FileNotFoundError(
                    f"stage {self.name} needs {run.file(name)}, written by stage {writer}: "
                    f"run `gkd-compress {writer}` (or `gkd-compress run`) on this run directory first"
                )


def _two_stage(recipe: Recipe) -> bool:
    return recipe.distill.schedule == "two_stage"


def distill_inputs(recipe: Recipe) -> tuple[str, ...]:
    teacher_head = recipe.distill.schedule == "one_stage" and loss_needs(recipe.distill.loss.name).teacher_segmentor
    return (TEACHER_FILE,) if recipe.models.teacher.train_encoder or teacher_head else ()


def _source(recipe: Recipe, labeled: bool = True) -> list[DataUse]:
    """The source split and, for multi-source recipes, every extra source (trained on together)."""
    extras = [DataUse(f"extra source {i}", extra, labeled) for i, extra in enumerate(recipe.data.extra_sources)]
    return [DataUse("source", recipe.data.source, labeled), *extras]


def _evaluation_data(recipe: Recipe) -> list[DataUse]:
    return [DataUse("source_val", recipe.data.source_val, True)] + [
        DataUse(f"target {name}", config, True) for name, config in recipe.data.targets.items()
    ]


def _validated(recipe: Recipe, config: OptimConfig | None) -> list[DataUse]:
    """Labelled source for a supervised stage, plus every evaluation domain when it validates."""
    return _source(recipe) + (_evaluation_data(recipe) if config is not None and config.validate_every else [])


def _distill_data(recipe: Recipe) -> list[DataUse]:
    if not _two_stage(recipe):
        return _validated(recipe, recipe.distill.joint)
    proxy = [DataUse("proxy", recipe.data.proxy, False)] if recipe.distill.task_agnostic and recipe.data.proxy else []
    return proxy + (_source(recipe, labeled=False) if recipe.distill.domain_agnostic else [])


def _distill_trainings(recipe: Recipe) -> list[TrainingUse]:
    distill = recipe.distill
    if not _two_stage(recipe):
        return [TrainingUse("distill_joint", distill.joint, "source")]
    phases = [
        ("distill_task_agnostic", distill.task_agnostic, "proxy"),
        ("distill_domain_agnostic", distill.domain_agnostic, "source"),
    ]
    return [TrainingUse(name, config, role) for name, config, role in phases if config is not None]


_TRAIN_DATA = ("seed", "data.img_size", "data.source", "data.extra_sources", "data.train_transform", "training")
_EVAL_DATA = ("data.img_size", "data.source_val", "data.targets", "data.eval_transform")


def _files(*names: str) -> Callable[[Recipe], tuple[str, ...]]:
    """A stage's files whatever the recipe."""
    return lambda recipe: names


STAGES: tuple[Stage, ...] = (
    Stage(
        "train-teacher",
        stage_train_teacher,
        _files(TEACHER_FILE),
        needed=lambda r: r.teacher_training is not None,
        distributed=True,
        data=lambda r: _validated(r, r.teacher_training),
        trainings=lambda r: [TrainingUse("teacher", r.teacher_training, "source")],
        sections=(
            *_TRAIN_DATA,
            "models.teacher",
            "models.teacher_decoder",
            "models.decoder",
            "data.teacher_transform",
            "teacher_training",
        ),
        weights=("teacher",),
        side_outputs=(validation_log("teacher"),),
    ),
    Stage(
        "distill",
        stage_distill,
        lambda r: (ENCODER_FILE,) if _two_stage(r) else (ENCODER_FILE, SEGMENTOR_FILE),
        distributed=True,
        inputs=distill_inputs,
        data=_distill_data,
        trainings=_distill_trainings,
        sections=(*_TRAIN_DATA, "models", "data.proxy", "data.proxy_transform", "data.distill_transform", "distill"),
        weights=("teacher", "student"),
        side_outputs=(validation_log("distill_joint"),),
        caches=teacher_cache_keys,
    ),
    Stage(
        "train-head",
        stage_train_head,
        _files(SEGMENTOR_FILE),
        needed=_two_stage,
        distributed=True,
        inputs=_files(ENCODER_FILE),
        data=lambda r: _validated(r, r.head),
        trainings=lambda r: [TrainingUse("head", r.head, "source")],
        sections=(*_TRAIN_DATA, "models.student", "models.decoder", "head"),
        weights=("student",),
        side_outputs=(BEST_SEGMENTOR_FILE, validation_log("head")),
    ),
    Stage(
        "train-no-kd",
        stage_train_no_kd,
        _files(NO_KD_FILE),
        needed=lambda r: r.compare.no_kd is not None,
        distributed=True,
        data=lambda r: _validated(r, r.compare.no_kd),
        trainings=lambda r: [TrainingUse("no_kd", r.compare.no_kd, "source")],
        sections=(*_TRAIN_DATA, "models.student", "models.decoder", "compare.no_kd"),
        weights=("student",),
        side_outputs=(validation_log("no_kd"),),
    ),
    Stage(
        "evaluate",
        stage_evaluate,
        _files(EVAL_FILE),
        inputs=_files(SEGMENTOR_FILE),
        reads=_files(TEACHER_FILE, NO_KD_FILE, SEGMENTOR_FILE, BEST_SEGMENTOR_FILE),
        data=_evaluation_data,
        sections=(*_EVAL_DATA, "evaluate"),
    ),
    Stage(
        "export",
        stage_export,
        _files(EXPORT_FILE),
        inputs=_files(SEGMENTOR_FILE),
        data=lambda r: [DataUse("source", r.data.source, True), DataUse("source_val", r.data.source_val, True)],
        sections=("seed", "data.img_size", "data.source", "data.source_val", "data.eval_transform", "export"),
    ),
    Stage(
        "benchmark",
        stage_benchmark,
        _files(BENCHMARK_FILE),
        inputs=_files(SEGMENTOR_FILE, EXPORT_FILE),
        data=lambda r: _evaluation_data(r) if r.benchmark.accuracy else [],
        sections=(*_EVAL_DATA, "evaluate", "benchmark"),
    ),
    Stage(
        "report",
        stage_report,
        _files(REPORT_JSON_FILE, REPORT_MD_FILE, MODEL_CARD_FILE),
        inputs=_files(EVAL_FILE),
        reads=_files(EVAL_FILE, EXPORT_FILE, BENCHMARK_FILE),
    ),
)


# -- what each stage consumed, and what is out of date -------------------------------------------------
def _section(dumped: dict, dotted: str) -> object:
    value: object = dumped
    for key in filter(None, dotted.split(".")):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _hash_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FileHashes:
    """Content hashes of files, remembered with each file's size and mtime in ``stages/file_hashes.json`` so
    an unchanged file (a multi-GB teacher) is hashed once, not on every run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.known: dict[str, list] = read_json(path) if path.is_file() else {}
        self.changed = False

    def __call__(self, file: Path) -> str | None:
        """The file's SHA-256 (None when it does not exist)."""
        if not file.is_file():
            return None
        stat = file.stat()
        key = str(file.resolve())
        known = self.known.get(key)
        if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            return known[2]
        digest = file_sha256(file)
        self.known[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            write_json(self.path, self.known)
            self.changed = False


def _record_file(run: Run, stage: Stage) -> Path:
    return run.file(RECORDS_DIR) / f"{stage.name}.json"


def consumed(run: Run, stage: Stage, hashes: FileHashes) -> dict:
    """What ``stage`` consumes now: hashes of its recipe sections, its run-directory inputs, the recipe's
    weight files it loads, and the fingerprints of the splits it reads (from the pre-flight check)."""
    recipe = run.recipe
    dumped = results_settings(recipe)  # no tracker settings: a new tracking URI reruns nothing
    weights = {role: getattr(recipe.models, role).weights for role in stage.weights}
    record = {
        "recipe": {section or "(all)": _hash_json(_section(dumped, section)) for section in stage.sections},
        "inputs": {name: hashes(run.file(name)) for name in stage.consumed_files(recipe)},
        "weights": {role: hashes(Path(path)) if path else None for role, path in weights.items()},
        "data": {use.role: run.fingerprints.get(use.role) for use in stage.data(recipe)},
    }
    caches = stage.caches(run, hashes)
    return {**record, "caches": caches} if caches else record  # no key without caches: records stay as they were


def _changes(before: dict, now: dict) -> list[str]:
    """What differs between two `consumed` records, in words (an unknown data fingerprint is no change)."""
    changes = []
    kinds = (("recipe", "recipe section"), ("inputs", "input"), ("weights", "weights of"), ("data", "data"))
    for kind, label in (*kinds, ("caches", "teacher cache of")):
        old, new = before.get(kind, {}), now.get(kind, {})
        for key in sorted(set(old) | set(new)):
            if kind == "data" and (old.get(key) is None or new.get(key) is None):
                continue
            if old.get(key) != new.get(key):
                changes.append(f"{label} {key} changed")
    return changes


@dataclass(frozen=True)
class Decision:
    """Whether a stage runs, from scratch (checkpoints dropped) or resuming, and why."""

    run: bool
    scratch: bool
    reason: str


def decide(run: Run, stage: Stage, hashes: FileHashes, forced: bool = False) -> Decision:
    """Run ``stage``? Like a build system: when forced, when an output is missing, when it did not finish,
    or when anything it consumed changed since it ran (then from scratch, as it also is when forced)."""
    if forced:
        return Decision(True, True, "forced")
    record_file = _record_file(run, stage)
    record = read_json(record_file) if record_file.is_file() else None
    changes = _changes(record["consumed"], consumed(run, stage, hashes)) if record else []
    if changes:
        return Decision(True, True, "; ".join(changes))
    if not stage.complete(run):
        interrupted = record is not None and record["status"] != "complete"
        return Decision(True, False, "interrupted, resuming" if interrupted else "outputs missing")
    if record is None:
        return Decision(True, False, "no record of what it consumed")
    if record["status"] != "complete":
        return Decision(True, False, "did not finish")
    return Decision(False, False, "up to date")


def downstream(recipe: Recipe, names: tuple[str, ...]) -> set[str]:
    """``names`` and every needed stage that consumes their outputs, transitively."""
    selected = set(names)
    for stage in STAGES:  # in pipeline order, so one pass sees every producer before its consumers
        if not stage.needed(recipe) or stage.name in selected:
            continue
        produced = {file for s in STAGES if s.name in selected for file in (*s.outputs(recipe), *s.side_outputs)}
        if produced & set(stage.consumed_files(recipe)):
            selected.add(stage.name)
    return selected


def _drop_training_state(run: Run, stage: Stage) -> None:
    """Checkpoints, JSONL metrics and TensorBoard events of the stage's training phases, and its side outputs
    (a fresh start: a validation history must not carry over)."""
    for name in stage.side_outputs:
        run.file(name).unlink(missing_ok=True)
    for use in stage.trainings(run.recipe):
        shutil.rmtree(run.file("checkpoints") / use.name, ignore_errors=True)
        shutil.rmtree(run.file("tensorboard") / use.name, ignore_errors=True)
        run.file("logs").joinpath(f"{use.name}.jsonl").unlink(missing_ok=True)


def run_stage(run: Run, stage: Stage, scratch: bool = False, hashes: FileHashes | None = None) -> None:
    """Run one stage on the ranks it belongs to (``scratch``: drop its checkpoints first); everyone waits for
    it to finish. Rank 0 records what it consumed, before ("running") and after ("complete")."""
    stage.check_inputs(run)
    hashes = hashes or FileHashes(run.file(RECORDS_DIR) / HASHES_FILE)
    if run.info.is_main:
        if scratch:
            _drop_training_state(run, stage)
        record = {"stage": stage.name, "status": "running", "consumed": consumed(run, stage, hashes)}
        write_json(_record_file(run, stage), record)
    barrier(run.info, f"start stage {stage.name}")
    if stage.distributed or run.info.is_main:
        log.info("stage %s", stage.name)
        stage.run(run)
    barrier(run.info, f"finish stage {stage.name} (rank 0 may run it alone)")
    if run.info.is_main:
        outputs = {name: hashes(run.file(name)) for name in stage.outputs(run.recipe)}
        write_json(_record_file(run, stage), {**record, "status": "complete", "outputs": outputs})
        hashes.save()


def _decide_on_main(run: Run, stage: Stage, hashes: FileHashes, forced: bool) -> Decision:
    """Rank 0 decides (it alone read the data); the other ranks take its decision."""
    decision = [decide(run, stage, hashes, forced) if run.info.is_main else None]
    if run.info.enabled:
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def run_one(run: Run, stage: Stage) -> None:
    """A stage's own subcommand: it runs even when up to date (resuming a finished checkpoint trains
    nothing), and from scratch when something it consumed changed since it last ran."""
    hashes = FileHashes(run.file(RECORDS_DIR) / HASHES_FILE)
    decision = _decide_on_main(run, stage, hashes, forced=False)
    if decision.run:
        log.info("stage %s: %s", stage.name, decision.reason)
    run_stage(run, stage, decision.scratch, hashes)


def run_all(run: Run, force: tuple[str, ...] = (), on_stage_end: Callable[[Stage], None] | None = None) -> list[str]:
    """Every needed stage in order, skipping those that are up to date; ``force`` names stages to redo from
    scratch with everything downstream of them; ``on_stage_end(stage)`` runs after each stage that ran (e.g.
    `gkd.tracking`). Returns the names of the stages that ran."""
    forced = downstream(run.recipe, force) if force else set()
    hashes = FileHashes(run.file(RECORDS_DIR) / HASHES_FILE)
    ran = []
    for stage in STAGES:
        if not stage.needed(run.recipe):
            continue
        decision = _decide_on_main(run, stage, hashes, stage.name in forced)
        if not decision.run:
            log.info("stage %s: up to date, skipped", stage.name)
            continue
        log.info(
            "stage %s: %s%s",
            stage.name,
            decision.reason,
            " (from scratch)" if decision.scratch and stage.trainings(run.recipe) else "",
        )
        run_stage(run, stage, decision.scratch, hashes)
        ran.append(stage.name)
        if on_stage_end is not None:
            on_stage_end(stage)
    if run.info.is_main:
        hashes.save()
    return ran


def stage_data(recipe: Recipe, stages: list[Stage]) -> list[DataUse]:
    """The splits ``stages`` read, each role once (labeled if any of them reads its labels)."""
    uses: dict[str, DataUse] = {}
    for stage in stages:
        for use in stage.data(recipe):
            known = uses.get(use.role)
            uses[use.role] = use if known is None or use.labeled else known
    return list(uses.values())


def check_run_inputs(run: Run, stages: list[Stage], full: bool = False, use_cache: bool = True) -> CheckResult:
    """The pre-flight check of everything ``stages`` read and build (see `gkd.preflight`); the data
    fingerprints are kept on ``run`` for the stage records. Problems are listed, not raised.

    Args:
        run: the run (its recipe, directory and world size).
        stages: the stages about to run.
        full: decode every image and label instead of the header check.
        use_cache: read and write the record of passed data checks in the run directory.
    """
    recipe, models = run.recipe, run.recipe.models
    loads = {role for stage in stages for role in stage.weights}
    segmentors = {
        "teacher": (models.teacher, models.teacher_decoder or models.decoder),
        "student": (models.student, models.decoder),
    }
    segmentors = {
        role: (model if role in loads else model.model_copy(update={"weights": None}), decoder)
        for role, (model, decoder) in segmentors.items()
    }
    trainings = [use for stage in stages for use in stage.trainings(recipe)]
    result = preflight(
        stage_data(recipe, stages),
        segmentors,
        trainings,
        run.num_classes,
        tuple(recipe.data.img_size),
        run.info.world_size,
        run.file(CHECKS_DIR) if use_cache else None,
        full,
    )
    run.fingerprints.update(result.fingerprints)
    return result
