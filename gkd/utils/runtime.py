"""Devices, torch.distributed set-up (torchrun env vars), seeding and RNG state."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gkd.utils.cpu import available_cpus
from gkd.utils.errors import DeviceUnavailableError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``); single
    process without them. NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(spec: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "--device cuda: no CUDA device is visible to this process (check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES), or use --device cpu / auto"
            )
        index = info.local_rank if info else 0
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if spec != "cpu":
        raise ValueError(f"unknown device {spec!r} (auto, cpu, cuda)")
    return torch.device("cpu")


MAX_AUTO_WORKERS = 16


def resolve_num_workers(setting: int | str, device: torch.device, local_world_size: int | None = None) -> int:
    """Data-loading workers per rank for ``num_workers: auto | N``.

    ``auto``: 0 on CPU, where training threads already use every core and workers would only compete with
    them; on GPU, the available CPUs split over the node's ranks (``LOCAL_WORLD_SIZE``, set by torchrun),
    one left to each training process, at most `MAX_AUTO_WORKERS`.
    """
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    ranks = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_AUTO_WORKERS, available_cpus() // max(ranks, 1) - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
