"""The pre-flight check ``run`` does before the first training step, so bad input stops a run in seconds
rather than after hours of training: every problem found is reported at once.

- Data: every file of every split the stages will read exists and its header decodes far enough to give
  its size (PNG chunks are CRC-checked by ``PIL.Image.verify``, a JPEG must end with its EOI marker);
  labels have their image's size. ``full`` decodes every image and maps every label instead. A dataset
  that passed is cached in the run directory under its fingerprint (its files' names, sizes and mtimes),
  so a re-run stats the files and reads none.
- Models: the teacher and student segmentors are built on the meta device (no memory, no weights) and run
  on one image of ``data.img_size``, which finds inconsistent shapes (``embed_dim % num_heads``, patch
  sizes, decoder layers); weight files must exist, and each is loaded strictly into its encoder on the meta
  device (keys and shapes), so a checkpoint of another architecture fails here naming the keys.
- Batch sizes: each training stage's batch splits over ranks x accumulation and fits in its dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open

from gkd.compress.config import OptimConfig
from gkd.data.base import CachedDataset, DataError, ImageListDataset, SegmentationDataset, load_problems, parallel_map
from gkd.data.config import SYNTHETIC, DatasetConfig, build_dataset
from gkd.models.checkpoint import build_segmentor
from gkd.models.decoders import DecoderConfig
from gkd.models.weights import load_weights
from gkd.models.zoo import ModelConfig
from gkd.utils.errors import InputCheckError
from gkd.utils.io import read_json, write_json

log = logging.getLogger("gkd")

CHECKS_DIR = "checks"
MAX_LISTED = 20  # problems listed in full; the rest are counted
JPEG_SUFFIXES = (".jpg", ".jpeg")
JPEG_END = b"\xff\xd9"


@dataclass(frozen=True)
class DataUse:
    """A split some stage reads: its config, whether labels are read, and the role it plays."""

    role: str
    config: DatasetConfig
    labeled: bool


# A part of the teacher's or the student's segmentor (a training phase's cost, `gkd.cost.RecipeModels.parts`).
Part = Literal["teacher", "teacher encoder", "teacher head", "student", "student encoder", "student head"]


@dataclass(frozen=True)
class TrainingUse:
    """A training phase: its name, its optimisation settings and the role of the split it trains on (with
    ``source``, every ``extra source <i>`` of a multi-source recipe counts towards its samples); the parts it
    trains and those it only runs forward."""

    name: str
    config: OptimConfig
    data_role: str
    trained: tuple[Part, ...] = ("student",)
    frozen: tuple[Part, ...] = ()


@dataclass
class CheckResult:
    """What the check found: a fingerprint and sample count per data role, and every problem."""

    fingerprints: dict[str, str] = field(default_factory=dict)
    num_samples: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def raise_if_problems(self) -> None:
        if self.problems:
            shown = self.problems[:MAX_LISTED]
            more = len(self.problems) - len(shown)
            raise InputCheckError(
                f"{len(self.problems)} problem(s) found before training, nothing was trained:\n"
                + "\n".join(f"  {problem}" for problem in shown)
                + (f"\n  ... and {more} more" if more else "")
            )


def _config_key(use: DataUse) -> str:
    text = json.dumps([use.config.model_dump(mode="json"), use.labeled], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sample_files(selection) -> list[tuple[Path, Path | None]]:
    """``(image, label or None)`` of each sample a selection serves; empty for generated data."""
    dataset = selection.dataset
    if isinstance(dataset, CachedDataset):
        dataset = dataset.dataset
    if isinstance(dataset, SegmentationDataset):
        return [dataset.pairs[i] for i in selection.indices]
    if isinstance(dataset, ImageListDataset):
        return [(dataset.paths[i], None) for i in selection.indices]
    return []


def _fingerprint(use: DataUse, files: list[tuple[Path, Path | None]]) -> str:
    """Hash of the config and each file's path, size and mtime (a changed, added or removed file changes it)."""
    digest = hashlib.sha256(json.dumps(use.config.model_dump(mode="json"), sort_keys=True).encode())
    for pair in files:
        for path in pair:
            if path is not None:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _header_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the header, after a structural check that decodes no pixels."""
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        if path.suffix.lower() in JPEG_SUFFIXES:
            with path.open("rb") as handle:
                handle.seek(-2, 2)
                if handle.read(2) != JPEG_END:
                    raise OSError("no end-of-image marker (truncated)")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: corrupt or unreadable image ({error})") from error
    return size


def _check_pair(pair: tuple[Path, Path | None]) -> str | None:
    image, label = pair
    try:
        size = _header_size(image)
        if label is not None:
            label_size = _header_size(label)
            if label_size != size:
                return f"{label}: label size {label_size} differs from image {size} ({image})"
    except DataError as error:
        return str(error)
    return None


def check_dataset(use: DataUse, cache_dir: Path | None, full: bool) -> tuple[str | None, int, list[str]]:
    """``(fingerprint, samples, problems)`` of one split (fingerprint None when it cannot be built)."""
    where = f"data {use.role} ({use.config.name}, split {use.config.split})"
    try:
        selection = build_dataset(use.config, transform=None, labeled=use.labeled)
    except DataError as error:
        return None, 0, [f"{where}: {error}"]
    files = _sample_files(selection)
    if use.config.name == SYNTHETIC:
        return _fingerprint(use, []), len(selection), []
    try:
        fingerprint = _fingerprint(use, files)
    except OSError as error:
        return None, len(selection), [f"{where}: {error}"]
    cache = cache_dir / f"data_{_config_key(use)}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        record = read_json(cache)
        if record.get("fingerprint") == fingerprint and (record.get("mode") == "full" or not full):
            return fingerprint, len(selection), []
    found = load_problems(selection, range(len(selection))) if full else parallel_map(_check_pair, files)
    problems = [f"{where}: {problem}" for problem in found if problem]
    if not problems and cache is not None:
        write_json(cache, {"fingerprint": fingerprint, "mode": "full" if full else "fast", "samples": len(files)})
    log.info("checked %s: %d samples%s", where, len(selection), f", {len(problems)} problems" if problems else "")
    return fingerprint, len(selection), problems


def _weights_problem(role: str, model: ModelConfig) -> str | None:
    weights = model.weights
    if weights is None:
        return None
    path = Path(weights)
    if not path.exists():
        return f"models.{role}.weights: {path} not found"
    if path.is_file() and path.stat().st_size == 0:
        return f"models.{role}.weights: {path} is empty (an interrupted copy?); copy it again"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as error:
            return f"models.{role}.weights: {path} is truncated or corrupt ({error}); copy it again"
    return None


def check_models(
    models: dict[str, tuple[ModelConfig, DecoderConfig]], num_classes: int, img_size: tuple[int, int]
) -> list[str]:
    """Problems building each ``{role: (backbone, decoder)}`` segmentor and running it at ``img_size``."""
    problems = []
    for role, (model, decoder) in models.items():
        weights_problem = _weights_problem(role, model)
        if weights_problem:
            problems.append(weights_problem)
        try:
            with torch.device("meta"):
                segmentor = build_segmentor(model.model_copy(update={"weights": None}), decoder, num_classes)
                logits = segmentor.eval()(torch.empty(1, 3, *img_size))
            if tuple(logits.shape) != (1, num_classes, *img_size):
                raise ValueError(f"logits of shape {tuple(logits.shape)}, expected {(1, num_classes, *img_size)}")
        except Exception as error:  # timm asserts, shape errors in any layer: all mean "this config cannot run"
            message = str(error) or type(error).__name__
            problems.append(f"models.{role} ({model.name} {model.kwargs or ''}): cannot be built and run: {message}")
            continue
        if model.weights is not None and not weights_problem:
            fit_problem = _weights_fit_problem(role, model, segmentor)
            problems += [fit_problem] if fit_problem else []
    return problems


def _weights_fit_problem(role: str, model: ModelConfig, segmentor: torch.nn.Module) -> str | None:
    """The recipe's checkpoint loaded strictly (keys and shapes, the layout conversions of `load_weights`) into
    the encoder built on the meta device: a checkpoint of another architecture fails here, naming its keys."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta parameters is a no-op by design here
            load_weights(segmentor.encoder.model, model.weights, resample_patch=model.patch_size is not None)
    except Exception as error:  # a mismatch names its keys; an unreadable file says why
        return f"models.{role}.weights: {error}"
    return None


def check_batches(trainings: list[TrainingUse], num_samples: dict[str, int], world_size: int) -> list[str]:
    """Each training batch splits evenly over ranks x accumulation steps and fits in its dataset."""
    problems = []
    for use in trainings:
        config = use.config
        per_step = world_size * config.accumulate
        if config.batch_size % per_step:
            problems.append(
                f"{use.name}: batch_size {config.batch_size} is not divisible by world size x accumulate ({per_step})"
            )
        extras = [role for role in num_samples if use.data_role == "source" and role.startswith("extra source ")]
        available = (
            sum(num_samples[role] for role in (use.data_role, *extras)) if use.data_role in num_samples else None
        )
        per_pass = config.batch_size // config.accumulate  # one forward pass over all ranks, as the trainer needs
        if available is not None and available < per_pass:
            problems.append(
                f"{use.name}: batch_size {config.batch_size} is larger than its dataset "
                f"(data {use.data_role}: {available} samples)"
                + (
                    f"; with accumulate {config.accumulate}, {per_pass} samples are needed"
                    if config.accumulate > 1
                    else ""
                )
            )
    return problems


def preflight(
    data: list[DataUse],
    models: dict[str, tuple[ModelConfig, DecoderConfig]],
    trainings: list[TrainingUse],
    num_classes: int,
    img_size: tuple[int, int],
    world_size: int,
    cache_dir: Path | None,
    full: bool = False,
) -> CheckResult:
    """Check everything a run will read and build; the result lists every problem (raise with
    `CheckResult.raise_if_problems`).

    Args:
        data: the splits the stages read (each role once).
        models: ``{role: (backbone config, decoder config)}`` of the segmentors the stages build.
        trainings: the training phases and the data role each trains on.
        num_classes: classes of the segmentors' heads.
        img_size: ``(H, W)`` the segmentors run at.
        world_size: DDP ranks the global batch sizes are split over.
        cache_dir: where passed data checks are remembered (None: not remembered).
        full: decode every image and label instead of the header check.
    """
    result = CheckResult()
    for use in data:
        fingerprint, samples, problems = check_dataset(use, cache_dir, full)
        if fingerprint is not None:
            result.fingerprints[use.role] = fingerprint
            result.num_samples[use.role] = samples
        result.problems += problems
    result.problems += check_models(models, num_classes, img_size)
    result.problems += check_batches(trainings, result.num_samples, world_size)
    return result
