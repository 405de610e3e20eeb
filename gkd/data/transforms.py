"""Training and evaluation transforms on samples (image + label jointly), built on
torchvision.transforms.v2, which resizes/crops/flips a ``Mask`` with its image (nearest for the mask).
All randomness comes from torch's RNG (the trainer seeds it per sample).

Training (mmseg's pipeline): ``RandomResize`` (one ratio in ``scale_range`` of ``base_size``, or of the
native size) -> ``RandomCrop`` (``cat_max_ratio``: retry up to 10 crops until no class covers more than
that share of the labeled pixels) padded to ``crop_size`` (image 0, label ignore) -> flip -> colour jitter.
Evaluation: resize the image (to ``size``, or its short side to ``short_side``); the label keeps its
native resolution unless ``resize_label`` (mmseg evaluates predictions resized back to the label).
Sliding-window inference belongs to the evaluate module, not here.

Image-only distillation stages (GKD 1a and 1b) may use timm's ImageNet training transform instead
(`ImageNetTransformConfig`: RandomResizedCrop, flip, colour jitter, RandAugment, RandomErasing), built by
``timm.data.create_transform`` as the GKD code builds it, its posterize ops keeping the 0-bit case the GKD
code's Pillow had (`_posterize`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from gkd.data.base import IGNORE_INDEX, Sample

if TYPE_CHECKING:
    from timm.data.auto_augment import AugmentOp


class TrainTransformConfig(BaseModel):
    """Recipe block `data.train_transform`: mmseg-style random resize -> crop -> flip -> photometric."""

    model_config = ConfigDict(extra="forbid")

    base_size: tuple[int, int] | None = Field(None, description="(H, W) the scale range is relative to; None = native")
    keep_ratio: bool = Field(True, description="fit the image in base_size keeping its aspect ratio (mmseg)")
    scale_range: tuple[float, float] = Field((0.5, 2.0), description="random resize ratio range")
    crop_size: tuple[int, int] = Field((512, 512), description="(H, W) of the random crop, padded if needed")
    cat_max_ratio: float = Field(1.0, gt=0, le=1, description="max share of one class in a crop (1 = off)")
    hflip: bool = True
    photometric: bool = Field(True, description="brightness/contrast/saturation/hue jitter")
    appearance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="strength of appearance-shift augmentation (exposure, gamma, colour cast, haze, sensor "
        "noise), for a teacher that must stand in for a robust foundation model; 0 = off",
    )

    @model_validator(mode="after")
    def _ordered(self) -> TrainTransformConfig:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range {self.scale_range}: need 0 < low <= high")
        return self


class ImageNetTransformConfig(BaseModel):
    """Recipe blocks `data.proxy_transform` / `data.distill_transform`: timm's ImageNet training transform
    (``timm.data.create_transform(is_training=True)``, whose keywords the fields are) for the unlabeled images of
    a distillation stage.
    Defaults are the GKD code's (general_distillation/main.py, DeiT's recipe): RandomResizedCrop (scale
    0.08-1, bicubic), flip, colour jitter 0.3, RandAugment ``rand-m9-mstd0.5-inc1``, RandomErasing 0.25."""

    model_config = ConfigDict(extra="forbid")

    input_size: int = Field(224, gt=0, description="side of the square RandomResizedCrop")
    scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range")
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float | None = Field(0.3, ge=0, description="timm applies it only without auto_augment")
    auto_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm auto-augment spec; null = off")
    interpolation: str = "bicubic"
    re_prob: float = Field(0.25, ge=0, le=1, description="RandomErasing probability; 0 = off")
    re_mode: str = "pixel"
    re_count: int = Field(1, ge=1)


class EvalTransformConfig(BaseModel):
    """Recipe block `data.eval_transform`."""

    model_config = ConfigDict(extra="forbid")

    size: tuple[int, int] | None = Field(None, description="(H, W) to resize the image to; None keeps native size")
    short_side: int | None = Field(None, gt=0, description="resize the image's short side to this, keeping ratio")
    resize_label: bool = Field(False, description="resize the label too (nearest); default: native labels")

    @model_validator(mode="after")
    def _one_size(self) -> EvalTransformConfig:
        if self.size is not None and self.short_side is not None:
            raise ValueError("give size or short_side, not both")
        return self


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
    """Random resize -> crop (padded) -> optional flip -> optional colour jitter, on image and label."""
    steps: list[v2.Transform] = [
        _RandomResize(config.base_size, config.scale_range, config.keep_ratio),
        _RandomCrop(config.crop_size, config.cat_max_ratio),
    ]
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if config.photometric:
        steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
    if config.appearance > 0:
        steps.append(_RandomAppearance(config.appearance))
    return _SampleTransform(v2.Compose(steps))


class _RandomAppearance(v2.Transform):
    """Random lighting/weather-like appearance shifts of the image (the label is untouched): exposure
    ``x * e^a``, gamma ``x ** e^g``, a per-channel colour cast, haze (blend towards grey) and Gaussian sensor
    noise, each range scaled by ``strength``. torchvision has no such transform (ColorJitter keeps the
    exposure range narrow and adds no noise or haze)."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength

    def make_params(self, flat_inputs: list) -> dict:
        s = self.strength
        return {
            "exposure": math.exp(_uniform(-1.6 * s, 0.4 * s)),
            "gamma": math.exp(_uniform(-0.4 * s, 0.6 * s)),
            "cast": torch.empty(3, 1, 1).uniform_(1 - 0.35 * s, 1 + 0.15 * s),
            "haze": _uniform(0.0, 0.6 * s) if _uniform(0, 1) < 0.3 else 0.0,
            "noise": _uniform(0.0, 0.05 * s),
            "seed": int(torch.randint(0, 2**31 - 1, ())),
        }

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        image = (inpt.as_subclass(torch.Tensor) * params["exposure"]).clamp(0, 1) ** params["gamma"]
        image = image * params["cast"]
        image = image * (1 - params["haze"]) + params["haze"] * 0.75
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(params["seed"]))
        return tv_tensors.wrap((image + params["noise"] * noise).clamp(0, 1), like=inpt)


class _ImageNetTransform:
    """A sample's image through timm's training transform. timm works on PIL images and normalises at the
    end; it is built with mean 0 / std 1 so the output stays in ``[0, 1]`` (each backbone normalises with its
    own statistics). RandomErasing's ``pixel`` mode then draws N(0, 1) noise in ``[0, 1]`` units rather than
    in normalised units (about 4x the contrast the GKD code's erased patches have after normalisation)."""

    def __init__(self, config: ImageNetTransformConfig) -> None:
        from timm.data import create_transform

        # every field of the config is a create_transform keyword of the same name
        self.pipeline = create_transform(
            **config.model_dump(), is_training=True, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
        )
        for op in _augment_ops(self.pipeline):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize

    def __call__(self, sample: Sample) -> Sample:
        pixels = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        image = self.pipeline(Image.fromarray(pixels))
        return {key: value for key, value in sample.items() if key != "label"} | {"image": image}


def _augment_ops(pipeline: Any) -> list[AugmentOp]:
    """The ``AugmentOp`` instances of timm's auto-augment steps (RandAugment, AutoAugment, AugMix) in a
    ``create_transform`` pipeline."""
    from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment

    ops: list[AugmentOp] = []
    for step in pipeline.transforms:
        if isinstance(step, (RandAugment, AugMixAugment)):
            ops += step.ops
        elif isinstance(step, AutoAugment):
            ops += [op for sub_policy in step.policy for op in sub_policy]
    return ops


def _posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, with 0 bits kept giving a black image as in Pillow up to 12.

    timm's level functions ask for 0 bits at the end of their range (``PosterizeIncreasing`` at magnitude 10,
    which ``rand-m9-mstd0.5-inc1`` draws for ~2 % of its ops; ``Posterize`` below magnitude 2.5, as in the
    ``v0`` policy). Pillow up to 12 (checked: ``ImageOps.posterize`` of 10.4 and 12.0) kept ``i & ~(2**8 - 1)``
    = 0 of every value, a black image, which is also TensorFlow's "keep 0 MSB" and what the GKD code trained on;
    Pillow 13 raises ``ValueError`` instead. Set on the ops of our own pipeline only (``AugmentOp.aug_fn``), so
    timm and Pillow stay unpatched.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits_to_keep)


def build_imagenet_transform(config: ImageNetTransformConfig) -> _ImageNetTransform:
    """timm's ImageNet training transform on a sample's image (the label, if any, is dropped)."""
    return _ImageNetTransform(config)


def build_eval_transform(config: EvalTransformConfig) -> _EvalResize | None:
    """The evaluation resize, or ``None`` when images are evaluated at native size."""
    if config.size is None and config.short_side is None:
        return None
    return _EvalResize(config.size, config.short_side, config.resize_label)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high))


def _randint(high: int) -> int:
    """Uniform in ``[0, high]``."""
    return int(torch.randint(0, high + 1, ()))


class _RandomResize(v2.Transform):
    """mmseg's ``RandomResize(scale=base_size, ratio_range=scale_range, keep_ratio)``: one random ratio
    of the target scale (of the native size when ``base_size`` is None), applied in a single resize.
    With ``keep_ratio`` the image is fitted in the scaled box: factor = min(long box edge / long image
    edge, short box edge / short image edge)."""

    def __init__(self, base_size: tuple[int, int] | None, scale_range: tuple[float, float], keep_ratio: bool) -> None:
        super().__init__()
        self.base_size, self.scale_range, self.keep_ratio = base_size, scale_range, keep_ratio

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.functional.get_size(flat_inputs[0])
        ratio = _uniform(*self.scale_range)
        if self.base_size is None:
            size = (height * ratio, width * ratio)
        elif self.keep_ratio:
            box = (self.base_size[0] * ratio, self.base_size[1] * ratio)
            factor = min(max(box) / max(height, width), min(box) / min(height, width))
            size = (height * factor, width * factor)
        else:
            size = (self.base_size[0] * ratio, self.base_size[1] * ratio)
        return {"size": [max(1, round(size[0])), max(1, round(size[1]))]}

    def transform(self, inpt, params: dict):
        return self._call_kernel(v2.functional.resize, inpt, size=params["size"], antialias=True)


class _RandomCrop(v2.Transform):
    """mmseg's ``RandomCrop`` (with ``cat_max_ratio``) then ``Pad`` to the crop size, bottom/right,
    image with 0 and label with ``IGNORE_INDEX``."""

    def __init__(self, size: tuple[int, int], cat_max_ratio: float) -> None:
        super().__init__()
        self.size, self.cat_max_ratio = size, cat_max_ratio

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.functional.get_size(flat_inputs[0])
        crop_h, crop_w = min(height, self.size[0]), min(width, self.size[1])
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        for _ in range(10):
            top, left = _randint(height - crop_h), _randint(width - crop_w)
            if mask is None or self.cat_max_ratio >= 1.0:
                break
            window = mask[..., top : top + crop_h, left : left + crop_w]
            _, counts = torch.unique(window[window != IGNORE_INDEX], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return {"box": (top, left, crop_h, crop_w), "pad": [0, 0, self.size[1] - crop_w, self.size[0] - crop_h]}

    def transform(self, inpt, params: dict):
        cropped = self._call_kernel(v2.functional.crop, inpt, *params["box"])
        if not any(params["pad"]):
            return cropped
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0.0
        return self._call_kernel(v2.functional.pad, cropped, padding=params["pad"], fill=fill)


class _EvalResize:
    """Resizes a sample's image (bilinear, antialiased) to ``size`` or to a short side; the label too
    (nearest) when ``resize_label``."""

    def __init__(self, size: tuple[int, int] | None, short_side: int | None, resize_label: bool) -> None:
        self.size, self.short_side, self.resize_label = size, short_side, resize_label

    def target_size(self, height: int, width: int) -> list[int]:
        if self.size is not None:
            return list(self.size)
        factor = self.short_side / min(height, width)
        return [max(1, round(height * factor)), max(1, round(width * factor))]

    def __call__(self, sample: Sample) -> Sample:
        size = self.target_size(*sample["image"].shape[-2:])
        resized = {**sample, "image": v2.functional.resize(sample["image"], size, antialias=True)}
        if self.resize_label and "label" in sample:
            label = v2.functional.resize(sample["label"][None], size, interpolation=InterpolationMode.NEAREST)[0]
            resized["label"] = label
        return resized
