"""Feature fidelity of a trained encoder against the teacher (`gkd.evaluate.fidelity`), on every evaluated
domain and the proxy: what the comparison (`gkd.compare`) probes each student with."""

from __future__ import annotations

from pathlib import Path

import torch

from gkd.data.config import build_dataset
from gkd.data.transforms import build_eval_transform
from gkd.evaluate.fidelity import DomainTokens, encode, evenly_spaced, fidelity_per_domain
from gkd.models.backbone import Backbone
from gkd.models.zoo import create_backbone_from_config
from gkd.stages.context import Run, evaluation_domains, teacher_backbone
from gkd.utils.io import atomic_path

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
