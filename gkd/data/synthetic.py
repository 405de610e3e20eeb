"""Generated street scenes with pixel labels: the self-contained data of the embedded default recipe.

No dataset can be downloaded at run time, so the default run draws its own: a horizon, sky, buildings
with windows, road with lane marks, trees, cars and people, each a class, with random colours, sizes
and sensor noise. Target domains apply visual shifts to the *same kind* of scenes: ``dusk`` (dark,
warm, noisy), ``fog`` (depth-dependent haze). ``world`` scenes each get their own lighting and weather, drawn
from a broad family (exposure, gamma, colour cast, depth haze, sensor noise): the world a vision foundation model
has seen, where dusk and fog are two looks among many. The default trains its stand-in VFM on labelled ``world``
scenes and distils on unlabelled ones (the proxy set), never on samples of the target splits. ``proxy`` images
are scenes with random colour styles (channel swaps, hue/gamma changes). Every sample is a pure function of
(seed, split, index), so runs are reproducible and nothing is stored on disk.
"""

from __future__ import annotations

import zlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import Dataset

from gkd.data.base import Sample, Transform, to_sample

SYNTHETIC_CLASSES = ["sky", "building", "road", "tree", "car", "person"]
SKY, BUILDING, ROAD, TREE, CAR, PERSON = range(len(SYNTHETIC_CLASSES))


class SyntheticOptions(BaseModel):
    """`options:` of a `synthetic` dataset in a recipe."""

    model_config = ConfigDict(extra="forbid")

    domain: Literal["day", "dusk", "fog", "world", "proxy"] = "day"
    num_samples: int = Field(128, gt=0)
    size: tuple[int, int] = Field((96, 128), description="(H, W) of the generated images")
    seed: int = 0

    @field_validator("size")
    @classmethod
    def _large_enough(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 32:  # the scene layout (horizon, car and person placement) needs room
            raise ValueError(f"size {size}: each side must be at least 32 pixels")
        return size


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: float RGB ``(H, W, 3)`` in [0, 1] and class ids ``(H, W)``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    label = np.zeros((height, width), np.uint8)
    horizon = rng.uniform(0.35, 0.55) * height

    top, bottom = rng.uniform([0.3, 0.5, 0.8], [0.5, 0.7, 1.0]), rng.uniform([0.6, 0.75, 0.9], [0.8, 0.9, 1.0])
    t = (yy / max(horizon, 1.0)).clip(0, 1)[..., None]
    image[:] = top * (1 - t) + bottom * t

    road = yy >= horizon
    image[road] = rng.uniform(0.3, 0.45) + rng.normal(0, 0.02, (int(road.sum()), 1))
    label[road] = ROAD
    lane = road & (np.abs(xx - width / 2) < 1 + (yy - horizon) * 0.03) & ((yy // 4) % 2 == 0)
    image[lane] = (0.9, 0.9, 0.85)

    x = rng.uniform(-0.1, 0.1) * width
    while x < width:
        building_width = rng.uniform(0.12, 0.3) * width
        building_top = horizon - rng.uniform(0.15, 0.9) * horizon
        block = (xx >= x) & (xx < x + building_width) & (yy >= building_top) & (yy < horizon)
        colour = rng.uniform(0.3, 0.8) * rng.uniform([0.8, 0.7, 0.6], [1.0, 1.0, 1.0])
        image[block] = colour
        windows = block & ((xx - x) % 6 >= 3) & ((yy - building_top) % 7 >= 4)
        image[windows] = colour * 0.45
        label[block] = BUILDING
        x += building_width + rng.uniform(0.0, 0.1) * width

    for _ in range(rng.integers(1, 4)):
        cx, ry = rng.uniform(0, width), rng.uniform(0.08, 0.2) * height
        crown = _ellipse(yy, xx, horizon - ry * 0.8, cx, ry, ry * rng.uniform(0.6, 1.0))
        shade = rng.uniform(0.25, 0.5)
        image[crown] = np.stack([shade * 0.4, shade, shade * 0.3]) + rng.normal(0, 0.04, (int(crown.sum()), 3))
        label[crown] = TREE

    for _ in range(rng.integers(1, 4)):
        y0 = rng.uniform(horizon + 2, height - 4)
        scale = (y0 - horizon) / max(height - horizon, 1.0) + 0.3
        car_h, car_w = 0.12 * height * scale, 0.22 * width * scale
        cx = rng.uniform(0, width)
        body = (np.abs(xx - cx) < car_w / 2) & (yy > y0 - car_h) & (yy <= y0)
        image[body] = rng.uniform(0.05, 0.95, 3)
        glass = body & (yy < y0 - car_h * 0.6) & (np.abs(xx - cx) < car_w * 0.35)
        image[glass] = (0.15, 0.2, 0.25)
        label[body] = CAR

    for _ in range(rng.integers(0, 3)):
        y0 = rng.uniform(horizon + 1, height - 2)
        scale = (y0 - horizon) / max(height - horizon, 1.0) + 0.4
        person_h = 0.25 * height * scale
        cx = rng.uniform(0, width)
        body = _ellipse(yy, xx, y0 - person_h / 2, cx, person_h / 2, person_h / 7)
        image[body] = rng.uniform(0.0, 1.0, 3)
        head = _ellipse(yy, xx, y0 - person_h * 0.95, cx, person_h / 9, person_h / 9)
        image[head] = (0.85, 0.65, 0.5)
        label[body | head] = PERSON

    image += rng.normal(0, 0.015, image.shape)
    return image.clip(0, 1), label


def _world_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw of the world's lighting and weather: exposure, gamma, colour cast, depth haze, sensor noise.

    The ranges span day to night and clear to dense haze; dusk and fog fall inside them as particular looks.
    """
    image = image ** np.exp(rng.uniform(-0.4, 0.7)) * np.exp(rng.uniform(-1.6, 0.3))
    image = image * rng.uniform([0.7, 0.6, 0.45], [1.15, 1.1, 1.15])
    if rng.uniform() < 0.4:
        height = image.shape[0]
        depth = 1.0 - np.abs(np.linspace(-1, 1, height, dtype=np.float32) * rng.uniform(0.5, 0.9))
        transmission = np.exp(-rng.uniform(0.3, 2.2) * depth)[:, None, None]
        image = image * transmission + rng.uniform(0.4, 0.9) * (1 - transmission)
    return image + rng.normal(0, rng.uniform(0.0, 0.05), image.shape)


def apply_domain(image: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """The visual shift of a target domain (``day`` is the source look)."""
    if domain == "dusk":
        tint = np.array([1.0, 0.78, 0.55], np.float32)
        image = (image**1.7) * rng.uniform(0.35, 0.5) * tint + rng.normal(0, 0.035, image.shape)
    elif domain == "fog":
        height = image.shape[0]
        depth = 1.0 - np.abs(np.linspace(-1, 1, height, dtype=np.float32) * 0.8)
        transmission = np.exp(-rng.uniform(1.2, 2.0) * depth)[:, None, None]
        image = image * transmission + rng.uniform(0.7, 0.85) * (1 - transmission)
    elif domain == "world":
        image = _world_look(image, rng)
    elif domain == "proxy":
        image = image[..., rng.permutation(3)] ** rng.uniform(0.6, 1.6)
        image = image * rng.uniform(0.6, 1.2, 3)
    return image.clip(0, 1)


class SyntheticSegmentation(Dataset):
    """Generated scenes for ``split`` (train / val / test draw disjoint seeds)."""

    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES

    def __init__(
        self, options: SyntheticOptions, split: str = "train", transform: Transform | None = None, labeled: bool = True
    ) -> None:
        self.options = options
        self.split = split
        self.transform = transform
        self.labeled = labeled and options.domain != "proxy"
        self._split_seed = zlib.crc32(f"{split}:{options.domain}".encode())

    def __len__(self) -> int:
        return self.options.num_samples

    def load(self, index: int) -> Sample:
        """The sample at native resolution, before the transform."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        scene_rng = np.random.default_rng([self.options.seed, self._split_seed, index])
        image, label = render_scene(scene_rng, *self.options.size)
        image = apply_domain(image, self.options.domain, scene_rng)
        path = f"synthetic://{self.options.domain}/{self.split}/{index}"
        return to_sample((image * 255).round().astype(np.uint8), label if self.labeled else None, path)

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        return self.transform(sample) if self.transform else sample
