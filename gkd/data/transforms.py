"""Training and evaluation transforms on samples (image + label jointly), built on
torchvision.transforms.v2, which resizes/crops/flips a `Mask` with its image (nearest for the mask)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torchvision import tv_tensors
from torchvision.transforms import v2

from gkd.data.base import IGNORE_INDEX, Sample


class TrainTransformConfig(BaseModel):
    """Recipe block `data.train_transform`: mmseg-style random resize -> crop -> flip -> photometric."""

    model_config = ConfigDict(extra="forbid")

    base_size: tuple[int, int] | None = Field(None, description="(H, W) the scale range is relative to; None = native")
    scale_range: tuple[float, float] = Field((0.5, 2.0), description="random resize ratio range")
    crop_size: tuple[int, int] = Field((512, 512), description="(H, W) of the random crop, padded if needed")
    hflip: bool = True
    photometric: bool = Field(True, description="brightness/contrast/saturation/hue jitter")


class EvalTransformConfig(BaseModel):
    """Recipe block `data.eval_transform`."""

    model_config = ConfigDict(extra="forbid")

    size: tuple[int, int] | None = Field(None, description="(H, W) to resize to; None keeps native size")


class _SampleTransform:
    """Applies a v2 pipeline to the image and (if present) the label of a sample."""

    def __init__(self, pipeline: v2.Transform) -> None:
        self.pipeline = pipeline

    def __call__(self, sample: Sample) -> Sample:
        image = tv_tensors.Image(sample["image"])
        if "label" in sample:
            image, label = self.pipeline(image, tv_tensors.Mask(sample["label"]))
            return {**sample, "image": image.as_subclass(torch.Tensor), "label": label.as_subclass(torch.Tensor)}
        return {**sample, "image": self.pipeline(image).as_subclass(torch.Tensor)}


def build_train_transform(config: TrainTransformConfig) -> _SampleTransform:
    steps: list[v2.Transform] = []
    low, high = config.scale_range
    if config.base_size is not None:
        steps.append(v2.Resize(config.base_size, antialias=True))
    steps.append(_RandomRescale(low, high))
    steps.append(
        v2.RandomCrop(config.crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX})
    )
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if config.photometric:
        steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
    return _SampleTransform(v2.Compose(steps))


def build_eval_transform(config: EvalTransformConfig) -> _SampleTransform | None:
    if config.size is None:
        return None
    return _SampleTransform(v2.Resize(config.size, antialias=True))


class _RandomRescale(v2.Transform):
    """Resize by one random ratio in ``[low, high]`` (mmseg's ``RandomResize`` with ``ratio_range``);
    torchvision's ``RandomResize`` draws a side length, not a ratio of the current size."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.functional.get_size(flat_inputs[0])
        ratio = float(torch.empty(1).uniform_(self.low, self.high))
        return {"size": [max(1, round(height * ratio)), max(1, round(width * ratio))]}

    def transform(self, inpt, params: dict):
        return self._call_kernel(v2.functional.resize, inpt, size=params["size"], antialias=True)
