"""Feature fidelity: how much of the teacher a student's own last-layer tokens carry, per domain.

Two numbers per domain, each from a closed-form least-squares fit on source images only (a target domain is
never fitted, so a drop on a target is the features' and not the probe's):

- **ridge R²** from the student's tokens to the teacher's (1: a linear map recovers the teacher's tokens);
- **linear-probe mIoU**: a least-squares linear classifier from the student's tokens to each patch's majority
  class, scored per token (patches whose majority label is "ignore" are skipped).

Least squares rather than SGD-trained probes: deterministic, seconds on a CPU, no schedule to tune, and the
same fit for every method, so rows compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gkd.data.base import IGNORE_INDEX
from gkd.models.backbone import Backbone
from gkd.models.features import align_tokens

RIDGE = 1e-2  # ridge strength, relative to the mean eigenvalue of the standardised inputs' Gram matrix


@dataclass
class DomainTokens:
    """Last-layer patch tokens of a set of images, ``(N, C)`` over all their patches, and each patch's
    majority class (``(N,)``, -1 = unlabelled or mostly ignore; ``None`` for an unlabelled set)."""

    tokens: torch.Tensor
    labels: torch.Tensor | None


def evenly_spaced(length: int, count: int) -> list[int]:
    """``count`` indices spread over ``range(length)`` (all of them when ``count >= length``)."""
    if count >= length:
        return list(range(length))
    return [int(i) for i in np.linspace(0, length - 1, count).round()]


def patch_labels(label: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Each patch's majority class of a ``(H, W)`` label map, ``(grid[0] * grid[1],)``; -1 where at least half
    the patch is ``IGNORE_INDEX``."""
    valid = label != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, label, num_classes).long(), num_classes + 1).permute(2, 0, 1).float()
    fractions = F.adaptive_avg_pool2d(one_hot[None], grid)[0].flatten(1)  # (classes + 1, N)
    majority = fractions[:num_classes].argmax(0)
    return torch.where(fractions[num_classes] >= 0.5, -1, majority)


@torch.no_grad()
def encode(
    encoder: Backbone,
    dataset: Dataset,
    indices: Sequence[int],
    num_classes: int,
    device: torch.device,
    grid: tuple[int, int] | None = None,
    batch_size: int = 8,
) -> DomainTokens:
    """Last-layer (normalised) patch tokens of ``dataset[indices]``, aligned to ``grid`` when given (a teacher
    at another patch size than the student), with patch labels when the samples have labels."""
    encoder.eval()
    tokens, labels = [], []
    for start in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[start : start + batch_size]]
        images = torch.stack([sample["image"] for sample in samples]).to(device)
        features = encoder(images, layers=(-1,))
        last = features.last if grid is None else align_tokens(features.last, features.grid, grid)
        tokens.append(last.float().flatten(0, 1).cpu())
        if "label" in samples[0]:
            target_grid = grid or features.grid
            labels += [patch_labels(sample["label"], target_grid, num_classes) for sample in samples]
    return DomainTokens(torch.cat(tokens), torch.cat(labels) if labels else None)


class LinearMap:
    """Ridge regression ``y ≈ standardise(x) @ W + b``, fitted in closed form (float64)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, ridge: float = RIDGE) -> None:
        x = inputs.double()
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - self.mean) / self.std
        y = targets.double()
        self.bias = y.mean(0)
        gram = x.T @ x
        strength = ridge * gram.diagonal().mean()
        self.weight = torch.linalg.solve(
            gram + strength * torch.eye(len(gram), dtype=gram.dtype), x.T @ (y - self.bias)
        )

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return ((inputs.double() - self.mean) / self.std) @ self.weight + self.bias


def r_squared(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Coefficient of determination over all output dimensions (variance-weighted), about the targets' mean."""
    targets = targets.double()
    residual = (targets - predicted).pow(2).sum()
    total = (targets - targets.mean(0)).pow(2).sum()
    return float(1 - residual / total)


def token_miou(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """mIoU (%) over patches with a label, averaged over the classes present in labels or predictions."""
    keep = labels >= 0
    confusion = torch.bincount(
        labels[keep] * num_classes + predicted[keep], minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    intersection = confusion.diagonal().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diagonal()
    present = union > 0
    return float(100 * (intersection[present] / union[present]).mean())


def fidelity_per_domain(
    domains: dict[str, tuple[DomainTokens, DomainTokens]],
    student_fit: DomainTokens,
    teacher_fit: DomainTokens,
    num_classes: int,
) -> dict[str, dict[str, float]]:
    """Ridge R² (student -> teacher tokens) and linear-probe mIoU for each domain's ``(student, teacher)``
    tokens, both maps fitted on the source tokens ``student_fit`` / ``teacher_fit``; ``probe_miou`` is absent
    for an unlabelled domain."""
    to_teacher = LinearMap(student_fit.tokens, teacher_fit.tokens)
    labelled = student_fit.labels is not None and bool((student_fit.labels >= 0).any())
    probe = None
    if labelled:
        keep = student_fit.labels >= 0
        one_hot = F.one_hot(student_fit.labels[keep], num_classes).double()
        probe = LinearMap(student_fit.tokens[keep], one_hot)
    results = {}
    for name, (student, teacher) in domains.items():
        entry = {"r2": r_squared(to_teacher(student.tokens), teacher.tokens)}
        if probe is not None and student.labels is not None:
            entry["probe_miou"] = token_miou(probe(student.tokens).argmax(1), student.labels, num_classes)
        results[name] = entry
    return results
