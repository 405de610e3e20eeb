"""What every stage shares: the run (`Run`: its recipe, directory, device and ranks, dataset and trainer
factories), model assembly, the validation hook of the training stages, the evaluation over every domain,
and the data each kind of stage reads (for the stage declarations).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset

from gkd.compress.trainer import Trainer, fingerprint
from gkd.data.config import DatasetConfig, build_dataset, dataset_info
from gkd.data.transforms import (
    ImageNetTransformConfig,
    build_eval_transform,
    build_imagenet_transform,
    build_train_transform,
)
from gkd.engine import Stage
from gkd.evaluate.inference import evaluate_predictor, torch_predictor
from gkd.models.backbone import Backbone
from gkd.models.checkpoint import build_segmentor, load_encoder, load_segmentor, save_encoder, save_segmentor
from gkd.models.segmentor import Segmentor
from gkd.models.weights import check_fit
from gkd.models.zoo import create_backbone_from_config, with_patch_size
from gkd.preflight import DataUse, Part, TrainingUse
from gkd.recipe import OptimConfig, Recipe, results_settings
from gkd.rundir import (
    BEST_SEGMENTOR_FILE,
    ENCODER_FILE,
    SOURCE_DOMAIN,
    SOURCE_SELECTION_FILE,
    TEACHER_CACHE_DIR,
    TEACHER_FILE,
    validation_log,
)
from gkd.utils.io import read_jsonl, require_free_space
from gkd.utils.runtime import DistInfo, barrier

T = TypeVar("T")


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
        return dataset_info(self.recipe.data.source)[0]

    @property
    def class_names(self) -> list[str]:
        return list(dataset_info(self.recipe.data.source)[1])

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

    def settings(self) -> dict:
        """The recipe as the results depend on it (no tracker settings: a new tracking URI reruns nothing)."""
        return results_settings(self.recipe)

    def weights_file(self, role: str) -> str | None:
        """The recipe's weight file of a model role (``teacher``, ``student``); None for a random init."""
        return getattr(self.recipe.models, role).weights

    def barrier(self, what: str) -> None:
        """Every rank waits here (nothing when not distributed); a timeout or a dead peer names ``what``."""
        barrier(self.info, what)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        values = [value]
        if self.info.enabled:
            dist.broadcast_object_list(values, src=0)
        return values[0]


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


# -- what the stages read, for their declarations -------------------------------------------------------
TRAIN_DATA = ("seed", "data.img_size", "data.source", "data.extra_sources", "data.train_transform", "training")
EVAL_DATA = ("data.img_size", "data.source_val", "data.targets", "data.eval_transform")


def files(*names: str) -> Callable[[Recipe], tuple[str, ...]]:
    """A stage's files whatever the recipe."""
    return lambda recipe: names


def two_stage(recipe: Recipe) -> bool:
    """GKD's two-stage schedule (distil the encoder, then train a head) rather than one joint stage."""
    return recipe.distill.schedule == "two_stage"


def source_data(recipe: Recipe, labeled: bool = True) -> list[DataUse]:
    """The source split and, for multi-source recipes, every extra source (trained on together)."""
    extras = [DataUse(f"extra source {i}", extra, labeled) for i, extra in enumerate(recipe.data.extra_sources)]
    return [DataUse("source", recipe.data.source, labeled), *extras]


def teacher_data(recipe: Recipe) -> list[DataUse]:
    """What a teacher without VFM weights is trained on: ``data.teacher_source``, else the source splits."""
    teacher_source = recipe.data.teacher_source
    return [DataUse("teacher source", teacher_source, True)] if teacher_source else source_data(recipe)


def evaluation_data(recipe: Recipe) -> list[DataUse]:
    """The held-out source split and every target domain, labelled."""
    return [DataUse("source_val", recipe.data.source_val, True)] + [
        DataUse(f"target {name}", config, True) for name, config in recipe.data.targets.items()
    ]


def validated_data(
    recipe: Recipe, config: OptimConfig | None, trained_on: Callable[[Recipe], list[DataUse]] = source_data
) -> list[DataUse]:
    """What a supervised stage trains on (labelled source), plus every evaluation domain when it validates."""
    return trained_on(recipe) + (evaluation_data(recipe) if config is not None and config.validate_every else [])


def whole_student(recipe: Recipe) -> tuple[tuple[Part, ...], tuple[Part, ...]]:
    """(trained, frozen) parts of a phase training the student end to end, with nothing frozen beside it."""
    return ("student",), ()


def supervised_stage(
    name: str,
    run: Callable[[Run], None],
    output: str,
    training: str,
    config: Callable[[Recipe], OptimConfig | None],
    sections: tuple[str, ...],
    weights: tuple[str, ...],
    trained_on: Callable[[Recipe], list[DataUse]] = source_data,
    parts: Callable[[Recipe], tuple[tuple[Part, ...], tuple[Part, ...]]] = whole_student,
    **options: Any,
) -> Stage:
    """A stage that trains on labelled source, on every rank, under ``config(recipe)`` (its training phase
    ``training``) and writes ``output``: needed when the recipe has that config; it reads the source (and the
    evaluation domains when it validates), its results depend on the training data and ``sections``, and it may
    write the phase's validation log. ``trained_on``: the labelled splits it trains on (default: the source);
    ``parts``: the (trained, frozen) parts of its phase (its cost; default: the whole student).
    ``options``: more `Stage` fields (``side_outputs`` come before the log)."""
    options.setdefault("needed", lambda recipe: config(recipe) is not None)
    side_outputs = (*options.pop("side_outputs", ()), validation_log(training))
    return Stage(
        name,
        run,
        files(output),
        distributed=True,
        data=lambda recipe: validated_data(recipe, config(recipe), trained_on),
        trainings=lambda recipe: [TrainingUse(training, config(recipe), trained_on(recipe)[0].role, *parts(recipe))],
        sections=(*TRAIN_DATA, *sections),
        weights=weights,
        side_outputs=side_outputs,
        **options,
    )
