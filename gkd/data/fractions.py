"""Label fractions of a source split (the 1/16, 1/8, 1/4, full protocol), chosen by a seeded list.

``fraction_indices(n, f, seed)`` takes the first ``ceil(f * n)`` entries of one seeded permutation of
``range(n)`` and sorts them. The same seed therefore gives *nested* subsets (1/16 within 1/8 within 1/4
within full), so a smaller fraction's labels are always part of a larger one's; a different seed gives an
independent draw. ``ceil`` matches the usual semi-supervised split sizes (Cityscapes 2975: 186 / 372 / 744).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

FractionName = Literal["1/16", "1/8", "1/4", "full"]
FRACTIONS: dict[str, float] = {"1/16": 1 / 16, "1/8": 1 / 8, "1/4": 1 / 4, "full": 1.0}


def fraction_value(fraction: str | float) -> float:
    """A named fraction or a number in ``(0, 1]`` as a float."""
    value = FRACTIONS[fraction] if isinstance(fraction, str) else float(fraction)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"fraction {fraction!r} is not in (0, 1]")
    return value


def fraction_size(n: int, fraction: str | float) -> int:
    """How many of ``n`` samples a fraction keeps: ``ceil(f * n)``, at least one when ``n > 0``."""
    return min(n, max(1 if n else 0, math.ceil(fraction_value(fraction) * n - 1e-9)))


def fraction_indices(n: int, fraction: str | float, seed: int) -> list[int]:
    """Sorted indices of the samples a fraction keeps (all of them for ``full``)."""
    size = fraction_size(n, fraction)
    if size == n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:size].tolist())
