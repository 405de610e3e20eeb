"""The trainer's metrics between two log lines: loss sums and the first non-finite step, kept on the device
until they are read, then averaged over steps and ranks."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from gkd.utils.runtime import DistInfo


class MetricsWindow:
    """What the steps since the last log line add up to, kept on the device until it is read."""

    # Far above any step count: (NO_STEP - step) under a MAX all-reduce gives the smallest bad step of all ranks.
    NO_STEP = 2**62

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.steps = 0
        self.images = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 0 = every loss finite

    def note_loss(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad == 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def add(self, outputs: dict[str, torch.Tensor], accumulate: int, images: int) -> None:
        for key, value in outputs.items():
            contribution = value.detach().float() / accumulate
            self.sums[key] = self.sums[key] + contribution if key in self.sums else contribution
        self.images += images

    def first_bad_step(self, info: DistInfo) -> int:
        """The first step with a non-finite loss on any rank (0 = none); waits for the device."""
        if not info.enabled:
            return int(self.first_bad)
        encoded = torch.where(self.first_bad > 0, self.NO_STEP - self.first_bad, 0)
        dist.all_reduce(encoded, op=dist.ReduceOp.MAX)
        return int(self.NO_STEP - encoded) if int(encoded) else 0

    def means(self, info: DistInfo) -> dict[str, float]:
        """Per-step means of the window's sums, averaged over ranks (one device -> host copy)."""
        keys = sorted(self.sums)
        values = torch.stack([self.sums[key] for key in keys]).double() / max(self.steps, 1)
        if info.enabled:
            dist.all_reduce(values)
            values /= info.world_size
        return dict(zip(keys, values.tolist(), strict=True))
