"""timm's auto-augment in the distillation stages' ImageNet transform: a posterize op asked to keep 0 bits
(``rand-m9-mstd0.5-inc1`` at magnitude 10) blackens the image as Pillow <= 12 did, instead of Pillow 13's
``ValueError``, and the other bit depths are Pillow's."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp

from gkd.data.transforms import ImageNetTransformConfig, build_imagenet_transform


def seed_everything(seed: int) -> None:
    """timm's ops draw from Python's and NumPy's RNGs, its crop and erasing from torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def posterize_ops(transform) -> list[AugmentOp]:
    """The posterize ops of the pipeline's auto-augment step (RandAugment/AugMix ``ops``, AutoAugment ``policy``)."""
    ops = []
    for step in transform.pipeline.transforms:
        ops += getattr(step, "ops", [])
        ops += [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]
    return [op for op in ops if op.name.startswith("Posterize")]


def record_posterize_bits(transform) -> list[int]:
    """Wrap the level function of every posterize op of ``transform``: the list fills with the bits each
    applied posterize op asks for."""
    drawn: list[int] = []
    for op in posterize_ops(transform):

        def recording(magnitude, hparams, level_fn=op.level_fn):
            args = level_fn(magnitude, hparams)
            drawn.append(args[0])
            return args

        op.level_fn = recording
    return drawn


@pytest.mark.parametrize(
    ("auto_augment", "samples"),
    [
        ("rand-m9-mstd0.5-inc1", 3000),  # the paper recipes' (DeiT's): magnitude 10 in ~2 % of the draws
        ("rand-m10-inc1", 100),
        ("v0", 200),  # ('Posterize', 0.8, 2): int(2 / 10 * 4) = 0 bits
        ("augmix-m10-mstd0", 100),
    ],
)
def test_zero_bit_posterize_is_drawn_and_survived(auto_augment, samples):
    transform = build_imagenet_transform(ImageNetTransformConfig(input_size=8, auto_augment=auto_augment))
    drawn = record_posterize_bits(transform)
    seed_everything(0)
    sample = {"image": torch.rand(3, 8, 8)}
    for _ in range(samples):
        assert transform(sample)["image"].shape == (3, 8, 8)
    assert 0 in drawn, f"no 0-bit posterize in {samples} samples: the case is not exercised"


def test_posterize_keeps_the_top_bits_and_zero_bits_is_black():
    """Every posterize op of the pipeline against the LUT of Pillow <= 12, written out: ``i & ~(2**(8-b) - 1)``."""
    transform = build_imagenet_transform(ImageNetTransformConfig(input_size=8))
    ops = posterize_ops(transform)
    assert [op.name for op in ops] == ["PosterizeIncreasing"]
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for bits in range(9):
        out = np.asarray(ops[0].aug_fn(Image.fromarray(pixels), bits))
        np.testing.assert_array_equal(out, pixels & np.uint8(~(2 ** (8 - bits) - 1) & 0xFF), err_msg=f"{bits} bits")
    assert not np.asarray(ops[0].aug_fn(Image.fromarray(pixels), 0)).any()
