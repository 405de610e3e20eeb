"""A tiny regression objective and dataset for trainer tests (importable by torchrun workers)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from gkd.compress.config import OptimConfig, TrainingConfig
from gkd.compress.trainer import Trainer
from gkd.utils.lock import RunDirLock
from gkd.utils.runtime import DistInfo, init_distributed


class ToyData(Dataset):
    """x ~ N(0, 1) in R^4 per sample (fixed), plus augmentation noise drawn from the seeded RNG."""

    def __init__(self, n: int = 32) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.x[index] + 0.1 * torch.randn(4), "target": self.x[index].sum(0, keepdim=True)}


class ToyObjective(nn.Module):
    """MSE of a small MLP with dropout (so the RNG state matters); NaN and kill injection."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.nan_at_step: int | None = None
        self.crash_at_step: int | None = None
        self.sigkill_at_step: int | None = None
        self.hang_at_step: int | None = None
        self.calls = 0

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.crash_at_step is not None and self.calls >= self.crash_at_step:
            raise KeyboardInterrupt("simulated kill")
        if self.sigkill_at_step is not None and self.calls >= self.sigkill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang_at_step is not None and self.calls >= self.hang_at_step:
            time.sleep(120)  # until the test kills the launcher (bounded: the step then goes on)
        loss = (self.net(batch["image"]) - batch["target"]).pow(2).mean()
        if self.nan_at_step is not None and self.calls >= self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss}


def make_trainer(run_dir: Path, steps: int, info: DistInfo | None = None, dropout: float = 0.1, **optim) -> Trainer:
    """8 samples a step; dropout makes per-rank RNG streams matter, so DDP comparisons switch it off."""
    optim = {"checkpoint_every": 3, "log_every": 1, **optim}
    config = OptimConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, **optim)
    info = info or DistInfo()
    return Trainer(
        name="toy",
        objective=ToyObjective(dropout),
        dataset=ToyData(),
        config=config,
        training=TrainingConfig(),
        run_dir=run_dir,
        device=torch.device("cpu"),
        info=info,
        seed=0,
        settings_fingerprint="toy",
    )


def read_losses(run_dir: Path) -> list[float]:
    lines = (Path(run_dir) / "logs" / "toy.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def main(argv: list[str]) -> None:
    """torchrun entry: RUN_DIR STEPS [--nan-rank R --nan-at N] [--crash-at N] [--sigkill-rank R --sigkill-at N]
    [--hang-at N]; 2 accumulation micro-steps; rank 0 holds the run directory's lock, as the CLI does."""
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--nan-rank", type=int, help="the rank whose loss turns NaN")
    parser.add_argument("--nan-at", type=int, help="from this objective call on")
    parser.add_argument("--crash-at", type=int, help="raise KeyboardInterrupt at this objective call (every rank)")
    parser.add_argument("--sigkill-rank", type=int, help="the rank that kills itself (SIGKILL), first attempt only")
    parser.add_argument("--sigkill-at", type=int, help="at this objective call")
    parser.add_argument("--hang-at", type=int, help="rank 0 sleeps 120 s at this objective call, first attempt only")
    parser.add_argument("--log-every", type=int, default=1)
    args = parser.parse_args(argv)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if not first_attempt and args.sigkill_rank == int(os.environ["RANK"]):
        time.sleep(5)  # the restarted ranks look its address up first: stale if the store kept the killed attempt's
    info = init_distributed("cpu")
    trainer = make_trainer(args.run_dir, args.steps, info, dropout=0.0, accumulate=2, log_every=args.log_every)
    if args.nan_rank == info.rank:
        trainer.objective.nan_at_step = args.nan_at
    if first_attempt:
        trainer.objective.sigkill_at_step = args.sigkill_at if args.sigkill_rank == info.rank else None
        trainer.objective.hang_at_step = args.hang_at if info.is_main else None
    trainer.objective.crash_at_step = args.crash_at
    try:
        with RunDirLock(args.run_dir) if info.is_main else nullcontext():  # as the CLI holds it
            trainer.fit()
    finally:
        if info.enabled:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
