"""Inference at the segmentor's fixed input size over images of any size, and split-level mIoU.

``whole``: resize the image to the input size, predict, resize logits back (mmseg ``mode='whole'``).
``slide``: windows of the input size with a stride, logits averaged where windows overlap
(mmseg ``slide_inference``); images smaller than a window are padded. Both only ever call the model
at its input size, so the same code evaluates PyTorch, ONNX Runtime, TensorRT and AOTInductor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gkd.evaluate.metrics import ConfusionMatrix

Predict = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] -> (B, K, H, W) logits


def resolve_stride(size: Sequence[int], stride: Sequence[int] | None) -> tuple[int, int]:
    """The slide stride: ``stride`` when given, else 2/3 of the window ``size``."""
    if stride is not None:
        return int(stride[0]), int(stride[1])
    return max(1, int(size[0]) * 2 // 3), max(1, int(size[1]) * 2 // 3)


def _windows(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    return sorted({*range(0, length - window, stride), length - window})


def slide_windows(frame: Sequence[int], size: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int]]:
    """Top-left corners of the windows of ``size`` that `slide_logits` runs over a frame of ``frame`` (H, W)."""
    height, width = max(frame[0], size[0]), max(frame[1], size[1])  # padded up to one window
    return [(y, x) for y in _windows(height, size[0], stride[0]) for x in _windows(width, size[1], stride[1])]


def slide_logits(
    predict: Predict, image: torch.Tensor, size: tuple[int, int], stride: tuple[int, int], batch: int
) -> torch.Tensor:
    """``(3, H, W)`` -> ``(K, H, W)`` logits averaged over overlapping windows of ``size``."""
    _, height, width = image.shape
    pad_h, pad_w = max(0, size[0] - height), max(0, size[1] - width)
    padded = F.pad(image, (0, pad_w, 0, pad_h))
    boxes = slide_windows((height, width), size, stride)
    total, count = None, torch.zeros(1, padded.shape[1], padded.shape[2])
    for start in range(0, len(boxes), batch):
        chunk = boxes[start : start + batch]
        crops = torch.stack([padded[:, y : y + size[0], x : x + size[1]] for y, x in chunk])
        logits = predict(crops).float().cpu()
        if total is None:
            total = torch.zeros(logits.shape[1], padded.shape[1], padded.shape[2])
        for (y, x), crop_logits in zip(chunk, logits, strict=True):
            total[:, y : y + size[0], x : x + size[1]] += crop_logits
            count[:, y : y + size[0], x : x + size[1]] += 1
    return (total / count)[:, :height, :width]


def frames_logits(
    predict: Predict,
    images: Sequence[torch.Tensor],
    size: tuple[int, int],
    mode: str,
    stride: tuple[int, int],
    batch: int,
) -> list[torch.Tensor]:
    """Each ``(3, H, W)`` frame's ``(K, H, W)`` logits at its own size, by the evaluation ``mode``: ``whole``
    frames resized to ``size``, ``batch`` per model call, logits resized back; ``slide`` windows, ``batch`` per
    call, stitched."""
    if mode == "slide":
        return [slide_logits(predict, image, size, stride, batch) for image in images]
    logits = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        resized = torch.stack(
            [F.interpolate(i[None], size=size, mode="bilinear", align_corners=False)[0] for i in chunk]
        )
        chunk_logits = predict(resized).float().cpu()
        logits += [_to_size(frame, image.shape[-2:]) for frame, image in zip(chunk_logits, chunk, strict=True)]
    return logits


def _to_size(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(K, h, w)`` logits resized (bilinear) to ``size`` (a frame's, or its label's native resolution)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def _collate(samples: list[dict]) -> list[dict]:
    return samples  # images of one split may differ in size


@torch.no_grad()
def evaluate_predictor(
    predict: Predict,
    dataset: Dataset,
    num_classes: int,
    size: tuple[int, int],
    mode: str = "whole",
    stride: tuple[int, int] | None = None,
    batch_size: int = 8,
    description: str = "evaluate",
    show_progress: bool = True,
) -> dict:
    """mIoU of ``predict`` over ``dataset`` (labels at native resolution), one confusion matrix."""
    confusion = ConfusionMatrix(num_classes)
    stride = resolve_stride(size, stride)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    for samples in tqdm(loader, desc=description, disable=not show_progress, leave=False):
        if mode == "slide":
            for sample in samples:
                logits = slide_logits(predict, sample["image"], size, stride, batch_size)
                confusion.update(_to_size(logits, sample["label"].shape[-2:]).argmax(0), sample["label"])
            continue
        resized = torch.stack(
            [F.interpolate(s["image"][None], size=size, mode="bilinear", align_corners=False)[0] for s in samples]
        )
        logits = predict(resized).float().cpu()
        for sample, sample_logits in zip(samples, logits, strict=True):
            confusion.update(_to_size(sample_logits, sample["label"].shape[-2:]).argmax(0), sample["label"])
    return confusion.compute()


def torch_predictor(model: torch.nn.Module, device: torch.device) -> Predict:
    """A `Predict` for a PyTorch segmentor in eval mode on ``device``."""
    model.eval()

    def predict(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images.to(device)).float()

    return predict
