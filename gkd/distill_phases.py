"""The training phases of stage ``distill`` (`gkd.stages.distill` runs them), declared below the stages so that
the comparison report (`gkd.report.comparison`) reads a job's schedule by the same phases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gkd.compress.config import OptimConfig
    from gkd.data.config import DatasetConfig
    from gkd.data.transforms import ImageNetTransformConfig
    from gkd.recipe import Recipe

JOINT = "distill_joint"  # the one-stage schedule's training phase (``distill.joint``)


@dataclass(frozen=True)
class Phase:
    """A phase of the two-stage schedule: its training phase name, and the recipe fields of its settings
    (``distill.<settings>``), images (``data.<images>``, also the data role), ImageNet transform
    (``data.<transform>``; None in the recipe: the training transform) and patch size (``distill.<patch_size>``;
    None: the models' own)."""

    name: str
    settings: str
    images: str
    transform: str
    patch_size: str | None = None

    def config(self, recipe: Recipe) -> OptimConfig | None:
        """Its optimisation settings (None: the recipe skips it)."""
        return getattr(recipe.distill, self.settings)

    def dataset(self, recipe: Recipe) -> DatasetConfig | None:
        """Its images."""
        return getattr(recipe.data, self.images)

    def transform_config(self, recipe: Recipe) -> ImageNetTransformConfig | None:
        """Its ImageNet transform (None: the training transform)."""
        return getattr(recipe.data, self.transform)

    def patch_size_of(self, recipe: Recipe) -> int | None:
        """The patch size both networks run at (None: their own)."""
        return getattr(recipe.distill, self.patch_size) if self.patch_size else None


PHASES = (  # 1a, then 1b
    Phase("distill_task_agnostic", "task_agnostic", "proxy", "proxy_transform", "task_agnostic_patch_size"),
    Phase("distill_domain_agnostic", "domain_agnostic", "source", "distill_transform"),
)
