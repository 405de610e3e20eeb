"""Devices, torch.distributed set-up (torchrun env vars), seeding and RNG state."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from gkd.utils.cpu import available_cpus
from gkd.utils.errors import DeviceUnavailableError
from gkd.utils.process import die_with_parent

DIST_TIMEOUT_ENV = "GKD_DIST_TIMEOUT"
DEFAULT_DIST_TIMEOUT_S = 1800  # torch's own default: ranks wait here while rank 0 alone exports and benchmarks


class DistributedTimeoutError(RuntimeError):
    """A rank waited longer than ``$GKD_DIST_TIMEOUT`` for the others; the message names what it waited for."""


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


def dist_timeout() -> timedelta:
    """How long a rank waits for the others (joining the group, a barrier, a collective): ``$GKD_DIST_TIMEOUT``
    seconds, else `DEFAULT_DIST_TIMEOUT_S`."""
    text = os.environ.get(DIST_TIMEOUT_ENV, str(DEFAULT_DIST_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def _timeout_advice(timeout: timedelta) -> str:
    return (
        f"waited {timeout.total_seconds():g} s; if a rank is merely slow (rank 0 alone checks the data, exports "
        f"and benchmarks), set {DIST_TIMEOUT_ENV}=SECONDS to wait longer, else see the other ranks' logs"
    )


def restart_attempt() -> int:
    """Which attempt of the job this process belongs to: torchrun's ``TORCHELASTIC_RESTART_COUNT`` (0 at first
    and without torchrun; ``--max-restarts N`` counts up to N)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _join_process_group(backend: str, timeout: timedelta) -> None:
    """``init_process_group`` through torchrun's store with this attempt's keys only.

    torchrun's agent keeps one TCPStore for the whole job (the workers connect to it as clients) and torch's
    ``env://`` rendezvous (2.14, tested) does not prefix the workers' keys per restart: after ``--max-restarts``
    restarted them, a rank read the gloo address the killed attempt's rank had published and failed connecting
    to its dead port ("Gloo connectFullMesh failed ... Connection refused"), or waited for it. The store is
    therefore wrapped in a `PrefixStore` named after the attempt.
    """
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"gkd/attempt_{restart_attempt()}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``); single
    process without them. NCCL on GPU, gloo on CPU.

    Under torchrun the process first arranges to die with its launcher (a killed ``torchrun`` would otherwise
    leave its ranks training, unwatched, in the run directory). Joining waits at most `dist_timeout`, which
    is also the timeout of every later collective; each restart attempt joins with keys of its own.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for the processes it starts
        die_with_parent()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        timeout = dist_timeout()
        try:
            _join_process_group("nccl" if device_kind == "cuda" else "gloo", timeout)
        except (dist.DistStoreError, dist.DistNetworkError) as error:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise DistributedTimeoutError(
                f"rank {os.environ.get('RANK')} of {world_size} (attempt {restart_attempt()}): could not join the "
                f"process group at {where} ({error}); {_timeout_advice(timeout)}"
            ) from error
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo, what: str) -> None:
    """Wait until every rank reaches this point (no-op on one process). A rank that waits longer than the
    group's timeout, or whose peer died, raises `DistributedTimeoutError` naming ``what`` it waited for."""
    if not info.enabled:
        return
    try:
        dist.barrier()
    except RuntimeError as error:  # gloo and NCCL raise plain RuntimeError / DistBackendError
        timeout = dist_timeout()
        cause = _timeout_advice(timeout) if "timed out" in str(error).lower() else "another rank failed or died"
        raise DistributedTimeoutError(
            f"rank {info.rank} of {info.world_size}: waiting for every rank to {what}: {cause} ({error})"
        ) from error


def device_kind(spec: str) -> str:
    """``cuda`` or ``cpu``: what ``spec`` (``auto``, ``cpu``, ``cuda``) asks for, ``auto`` by what is visible."""
    return "cuda" if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(spec: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if spec == "auto":
        spec = device_kind(spec)
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
