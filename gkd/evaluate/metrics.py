"""mIoU over a whole split: one confusion matrix, accumulated, never a mean of per-image IoUs."""

from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion (rows: ground truth, cols: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted class ids and targets (same shape, any leading dims)."""
        prediction = torch.as_tensor(prediction).reshape(-1).to("cpu", torch.int64)
        target = torch.as_tensor(target).reshape(-1).to("cpu", torch.int64)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        keep = target != self.ignore_index
        prediction, target = prediction[keep], target[keep]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target ids outside [0, {self.num_classes}) besides ignore {self.ignore_index}")
        # A predicted id outside the classes would land in another class's bins (K -> next row) or crash the
        # reshape (255): a model with the wrong number of classes, or a runtime returning garbage.
        if prediction.numel() and (prediction.min() < 0 or prediction.max() >= self.num_classes):
            bad = sorted({int(v) for v in prediction[(prediction < 0) | (prediction >= self.num_classes)][:1000]})
            raise ValueError(f"predicted ids {bad[:5]} outside [0, {self.num_classes})")
        bins = torch.bincount(target * self.num_classes + prediction, minlength=self.num_classes**2)
        self.matrix += bins.reshape(self.num_classes, self.num_classes)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    def compute(self) -> dict:
        """Per-class IoU, mIoU (over classes present in ground truth or prediction) and pixel accuracy."""
        return metrics_from_confusion(self.matrix.numpy())


def metrics_from_confusion(matrix: np.ndarray) -> dict:
    """IoU_c = TP / (TP + FP + FN). Classes with no ground-truth and no predicted pixel get ``nan`` and
    are left out of the mean, as mmsegmentation's ``IoUMetric`` does."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    total = matrix.sum()
    valid = ~np.isnan(iou)
    return {
        "miou": float(np.mean(iou[valid])) * 100 if valid.any() else float("nan"),
        "iou": [None if np.isnan(v) else float(v) * 100 for v in iou],
        "pixel_accuracy": float(true_positive.sum() / total) * 100 if total else float("nan"),
        "pixels": int(total),
    }
