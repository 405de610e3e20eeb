"""The recipe: one YAML file validated by pydantic, resolved over defaults, saved in the run dir.

Unknown keys and bad values are errors naming the key (``extra="forbid"`` everywhere). The embedded
default recipe (``gkd/recipes/default.yaml``) runs every stage on generated data on 2 CPU cores.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from gkd.compare_config import CompareConfig
from gkd.compress.config import OptimConfig, TeacherCacheConfig, TrainingConfig
from gkd.compress.losses import loss_needs, validate_loss_options
from gkd.data.config import DatasetConfig, dataset_info
from gkd.data.transforms import EvalTransformConfig, ImageNetTransformConfig, TrainTransformConfig
from gkd.export.benchmark import BenchmarkConfig
from gkd.export.config import ExportConfig
from gkd.models.decoders import DecoderConfig
from gkd.models.zoo import ModelConfig
from gkd.rundir import RECIPE_FILE
from gkd.tracking_config import LoggingConfig

log = logging.getLogger("gkd")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossConfig(_Strict):
    name: str = "qsd"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        self.options = validate_loss_options(self.name, self.options)
        return self


class TeacherConfig(ModelConfig):
    """The frozen teacher. ``train_encoder`` is for recipes without VFM weights: the encoder is then
    first trained on the labeled source (it stands in for a VFM, and the report says so)."""

    train_encoder: bool = False


class ModelsConfig(_Strict):
    teacher: TeacherConfig
    student: ModelConfig
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    teacher_decoder: DecoderConfig | None = Field(None, description="the teacher's head; default: same as decoder")


class DataConfig(_Strict):
    img_size: tuple[int, int] = Field((512, 512), description="(H, W) the segmentor is trained, exported and run at")
    source: DatasetConfig = Field(description="labeled source domain, train split")
    extra_sources: list[DatasetConfig] = Field(
        default_factory=list,
        description="further labeled source datasets trained on together with `source` (multi-source training, "
        "e.g. GTAV + SYNTHIA + UrbanSyn); each must share source's class table",
    )
    source_val: DatasetConfig = Field(description="labeled source domain, held-out split")
    teacher_source: DatasetConfig | None = Field(
        None,
        description="labeled images a teacher without VFM weights (`train_encoder`) is trained on, standing in for "
        "the VFM's own pre-training data (never the target splits); default: source",
    )
    proxy: DatasetConfig | None = Field(None, description="unlabeled proxy images (task-agnostic distillation)")
    targets: dict[str, DatasetConfig] = Field(description="unseen target domains, by name (evaluation only)")
    train_transform: TrainTransformConfig = Field(default_factory=TrainTransformConfig)
    teacher_transform: TrainTransformConfig | None = Field(
        None, description="the teacher stage's training transform; default: train_transform"
    )
    eval_transform: EvalTransformConfig = Field(default_factory=EvalTransformConfig)
    proxy_transform: ImageNetTransformConfig | None = Field(
        None, description="distill 1a: timm's ImageNet train transform on the proxy images; default: train_transform"
    )
    distill_transform: ImageNetTransformConfig | None = Field(
        None, description="distill 1b: timm's ImageNet train transform on source images; default: train_transform"
    )

    @model_validator(mode="after")
    def _same_classes(self) -> DataConfig:
        classes = dataset_info(self.source)[1]
        for index, extra in enumerate(self.extra_sources):
            if dataset_info(extra)[1] != classes:
                raise ValueError(f"data.extra_sources.{index}: {extra.name} has other classes than {self.source.name}")
        if self.teacher_source is not None and dataset_info(self.teacher_source)[1] != classes:
            raise ValueError(
                f"data.teacher_source: {self.teacher_source.name} has other classes than data.source "
                f"({self.source.name}); set data.teacher_source: null to train the teacher on the source, or name a "
                "labelled dataset with the source's classes"
            )
        return self

    @model_validator(mode="after")
    def _crop_is_img_size(self) -> DataConfig:
        if tuple(self.train_transform.crop_size) != tuple(self.img_size):
            raise ValueError(
                f"data.train_transform.crop_size {self.train_transform.crop_size} must equal data.img_size"
            )
        return self


class DistillConfig(_Strict):
    """Stage 1 (two-stage schedule) or the joint objective (one-stage schedule)."""

    schedule: Literal["two_stage", "one_stage"] = "two_stage"
    loss: LossConfig = Field(default_factory=LossConfig)
    task_agnostic: OptimConfig | None = Field(None, description="1a: distill on the proxy set; null = skip")
    domain_agnostic: OptimConfig | None = Field(None, description="1b: distill on source images; null = skip")
    task_agnostic_patch_size: int | None = Field(
        None,
        gt=0,
        description="1a: run teacher and student at this patch size (the GKD code: 14 on 224 crops; the student "
        "is converted back to its own patch size for 1b); null = the models' own",
    )
    joint: OptimConfig | None = Field(None, description="one_stage: task loss + distillation loss, jointly")
    distill_weight: float = Field(1.0, gt=0, description="one_stage: weight of the distillation loss")
    teacher_cache: TeacherCacheConfig | None = Field(
        None,
        description="two_stage: the teacher's tokens of K views per image computed once and read back by every "
        "step (and every compare job sharing teacher, data, transform and K); the student then sees only those "
        "K views; null = the teacher runs every step",
    )

    @model_serializer(mode="wrap")
    def _without_unset_cache(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No ``teacher_cache`` key while it is off: resolved recipes and stage records of recipes without it
        stay byte for byte what they were before the option existed."""
        dumped = handler(self)
        if dumped.get("teacher_cache") is None:
            dumped.pop("teacher_cache", None)
        return dumped


class EvaluateConfig(_Strict):
    batch_size: int = Field(8, gt=0)
    mode: Literal["whole", "slide"] = "whole"
    stride: tuple[int, int] | None = Field(None, description="slide: window stride (H, W); default 2/3 of img_size")


class Recipe(_Strict):
    name: str = "recipe"
    seed: int = 0
    models: ModelsConfig
    data: DataConfig
    teacher_training: OptimConfig | None = Field(
        None, description="train the teacher's head (and encoder if models.teacher.train_encoder) on source"
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)
    head: OptimConfig | None = Field(None, description="stage 2: decoder on the frozen student encoder")
    compare: CompareConfig = Field(default_factory=CompareConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="experiment trackers (gkd.tracking)")

    @model_serializer(mode="wrap")
    def _without_unset_logging(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No ``logging`` key while no tracker is set: resolved recipes and report files of recipes without
        one stay byte for byte what they were before trackers existed."""
        dumped = handler(self)
        if not self.logging.enabled:
            dumped.pop("logging", None)
        return dumped

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """``evaluate.validate_every`` (recipes and run directories written before it moved) becomes
        ``head.validate_every``, the setting it always meant: validation of train-head."""
        evaluate = data.get("evaluate") if isinstance(data, dict) else None
        if not isinstance(evaluate, dict) or "validate_every" not in evaluate:
            return data
        every = evaluate["validate_every"]
        data = {**data, "evaluate": {k: v for k, v in evaluate.items() if k != "validate_every"}}
        if every is not None:
            if not isinstance(data.get("head"), dict):
                raise ValueError("evaluate.validate_every is now head.validate_every, and this recipe has no head")
            log.warning("recipe: evaluate.validate_every is now head.validate_every (%s); read as such", every)
            data["head"] = {**data["head"], "validate_every": data["head"].get("validate_every", every)}
        return data

    @field_validator("data")
    @classmethod
    def _has_targets(cls, data: DataConfig) -> DataConfig:
        if not data.targets:
            raise ValueError("data.targets: name at least one target domain")
        return data

    @model_validator(mode="after")
    def _schedule_is_complete(self) -> Recipe:
        distill = self.distill
        needs = loss_needs(distill.loss.name)
        if distill.schedule == "two_stage":
            if not needs.two_stage:
                raise ValueError(f"distill.loss: {distill.loss.name} takes {needs.inputs}; it needs schedule one_stage")
            if distill.task_agnostic is None and distill.domain_agnostic is None:
                raise ValueError("distill: two_stage needs task_agnostic and/or domain_agnostic")
            if distill.task_agnostic is not None and self.data.proxy is None:
                raise ValueError("data.proxy: task_agnostic distillation needs a proxy image set")
            if self.head is None:
                raise ValueError("head: two_stage needs stage 2 (head) settings")
            teacher = self.models.teacher
            if distill.teacher_cache is not None and not (teacher.weights or teacher.train_encoder):
                raise ValueError(
                    "distill.teacher_cache: a cache is named by the teacher's weights file; give "
                    "models.teacher.weights (a randomly initialised teacher differs from run to run)"
                )
        else:
            if distill.joint is None:
                raise ValueError("distill.joint: one_stage needs its optimisation settings")
            if distill.teacher_cache is not None:
                raise ValueError("distill.teacher_cache: only the two_stage schedule reads a teacher cache")
            if needs.teacher_segmentor and self.teacher_training is None:
                raise ValueError(f"teacher_training: {distill.loss.name} needs a teacher with a trained head")
        if self.models.teacher.train_encoder and self.teacher_training is None:
            raise ValueError("teacher_training: models.teacher.train_encoder needs teacher_training settings")
        return self


class RecipeError(ValueError):
    """A recipe that does not validate; the message names each bad key."""


def format_validation_error(error: ValidationError) -> str:
    """One line per bad key, ``dotted.key: message``; errors of nested ``options`` (validated by a loss's or
    a dataset's own model) are expanded to their own keys."""
    lines = []
    for item in _flatten(error.errors(), ()):
        key = ".".join(str(part) for part in item["loc"]) or "(recipe)"
        lines.append(f"  {key}: {item['msg']}")
    return "invalid recipe:\n" + "\n".join(lines)


def _flatten(items: list, prefix: tuple) -> list[dict]:
    flat = []
    for item in items:
        loc = (*prefix, *item["loc"])
        cause = getattr(item.get("ctx", {}).get("error"), "__cause__", None)
        if isinstance(cause, ValidationError):
            flat += _flatten(cause.errors(), (*loc, "options"))
        else:
            flat.append({**item, "loc": loc})
    return flat


def parse_recipe(data: dict) -> Recipe:
    """Validate a recipe mapping; `RecipeError` lists every bad key."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_validation_error(error)) from None


BASE_KEY = "base"


def merge(base: dict, override: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in ``override`` replaces ``base``. A section that
    names another kind (a dataset, a loss: its ``name`` changes) drops the base's ``options``, which belong to
    the base's kind (a generated dataset's ``num_samples`` mean nothing to a ``folder``)."""
    renamed = "name" in override and "name" in base and override["name"] != base["name"]
    merged = {key: value for key, value in base.items() if not (renamed and key == "options")}
    for key, value in override.items():
        merged[key] = (
            merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _read_mapping(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a mapping, with its ``base:`` files (paths relative to it) merged underneath."""
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found" + (f" (base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise RecipeError(f"recipe {path}: circular base chain")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys")
    bases = data.pop(BASE_KEY, None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge(merged, _read_mapping(path.parent / base, (*chain, path.resolve())))
    return merge(merged, data)


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file (``base:`` names files it extends, merged like mmseg/DINOv2 configs), or the
    embedded default when ``path`` is None, then apply dotted ``key=value`` ``overrides`` (`apply_overrides`)."""
    if path is None:
        with resources.as_file(resources.files("gkd").joinpath("recipes/default.yaml")) as default:
            data = _read_mapping(default)
    else:
        data = _read_mapping(Path(path))
    return parse_recipe(apply_overrides(data, overrides))


OVERRIDE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def is_override(text: str) -> bool:
    """Whether a command-line word is a dotted ``key=value`` recipe override (``head.lr=1e-3``)."""
    return bool(OVERRIDE_PATTERN.match(text))


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``data`` with each ``a.b.c=value`` set (mmengine's ``--cfg-options``): the value is parsed as YAML
    (``1e-3``, ``[144, 192]``, ``{name: mse}``, ``null``), missing mappings on the way are created, and the
    result is validated by the recipe schema like any recipe, so an unknown key or a bad value is an error."""
    data = copy.deepcopy(data)
    for override in overrides:
        if not is_override(override):
            raise RecipeError(f"override {override!r}: expected dotted.key=value (e.g. head.lr=1e-3)")
        key, text = override.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or error
            raise RecipeError(f"override {override!r}: the value is not valid YAML ({problem})") from None
        if isinstance(value, str) and _FLOAT.match(value):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        node = data
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[: depth + 1])
                raise RecipeError(f"override {override!r}: {where} is {child!r}, not a mapping of keys")
            node = child
        node[leaf] = value
    return data


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def results_settings(recipe: Recipe) -> dict:
    """The recipe as a JSON-ready dict less ``logging``: what results depend on (trackers change none)."""
    dumped = recipe.model_dump(mode="json")
    dumped.pop("logging", None)
    return dumped


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in) as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def check_same_recipe(folder: Path, recipe: Recipe, what: str = "the results") -> None:
    """Refuse a folder whose saved resolved recipe is another one: results of two recipes are never mixed.
    Recipes that differ only in how a comparison is reported (`REPORT_ONLY_COMPARE_KEYS`) are the same one.

    Args:
        folder: a run directory or a comparison's output directory.
        recipe: the recipe about to write there.
        what: what the folder holds, for the message (``the results``, ``a comparison``).
    """
    saved = Path(folder) / RECIPE_FILE
    if saved.is_file() and _what_results_depend_on(load_recipe(saved)) != _what_results_depend_on(recipe):
        raise RecipeError(f"{folder} holds {what} of another recipe ({saved}); use a new --out directory")


# Keys of the comparison report alone: changing them re-tabulates a finished comparison, never retrains it.
# (figure_domain is not one: each job saves its predictions on that domain's example frames.)
REPORT_ONLY_COMPARE_KEYS = ("reference_domain", "figure_methods", "paired_with")


def _what_results_depend_on(recipe: Recipe) -> dict:
    """The recipe as a dict, less its trackers and the comparison report's presentation keys."""
    settings = results_settings(recipe)  # trackers (``logging``) change no result
    for key in REPORT_ONLY_COMPARE_KEYS:
        settings["compare"].pop(key)
    return settings
