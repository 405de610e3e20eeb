"""CPU threads from the CPUs actually free, and how busy other processes kept the CPUs while we timed.

torch's default (one intra-op thread per core) oversubscribes a shared machine: on 2 busy cores a
60-step teacher took 116-248 s with the default and 20 s with one thread. No library reports the CPUs
*this process may use and that others leave idle* (psutil is not a dependency, and ``os.getloadavg`` is
host-wide inside containers), so this reads the affinity mask, the cgroup v2 quota and ``/proc/stat``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PROC_STAT = Path("/proc/stat")


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota when one is set."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def _busy_and_total_seconds() -> tuple[float, float] | None:
    """Busy and total CPU seconds since boot, summed over the CPUs of this process's affinity mask."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()) or (cpus is not None and int(name[3:]) not in cpus):
            continue
        values = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return (busy / ticks, total / ticks) if total else None


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class OtherLoad:
    """CPUs kept busy by *other* processes between `start` and `stop` (this process's own time subtracted)."""

    start_stat: tuple[float, float] | None = None
    start_own: float = 0.0
    start_wall: float = 0.0

    def start(self) -> OtherLoad:
        self.start_stat, self.start_own, self.start_wall = (
            _busy_and_total_seconds(),
            _own_cpu_seconds(),
            time.monotonic(),
        )
        return self

    def stop(self) -> float | None:
        """Average number of CPUs other processes used; None where ``/proc/stat`` is not available."""
        end = _busy_and_total_seconds()
        wall = time.monotonic() - self.start_wall
        if end is None or self.start_stat is None or wall <= 0:
            return None
        others = (end[0] - self.start_stat[0]) - (_own_cpu_seconds() - self.start_own)
        return max(0.0, others / wall)


def others_busy_cpus(seconds: float = 0.3) -> float | None:
    """CPUs other processes use right now, sampled over ``seconds``."""
    load = OtherLoad().start()
    time.sleep(seconds)
    return load.stop()


def machine_busy(other_cpus: float | None, threads: int) -> bool:
    """Whether other processes competed with ``threads`` of ours for the available CPUs."""
    return other_cpus is not None and other_cpus >= 0.25 and other_cpus + threads > available_cpus()


def choose_threads(requested: int | None = None, loader_workers: int = 0, processes: int = 1) -> tuple[int, str]:
    """Intra-op threads for this process and why: ``requested`` (``--threads``), else ``$OMP_NUM_THREADS``, else
    the free CPUs (available minus what other processes use now) shared by ``processes`` processes on this
    machine, less this process's DataLoader workers; at least 1.

    Args:
        requested: an explicit thread count (``--threads``), used as given.
        loader_workers: DataLoader worker processes each training process starts (each takes about a CPU).
        processes: training processes on this machine (DDP ranks) sharing the CPUs.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, not {requested}")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cpus = available_cpus()
    busy = others_busy_cpus() or 0.0
    free = max(1.0, cpus - busy)
    threads = max(1, math.floor(free / max(1, processes) + 0.5) - loader_workers)
    return threads, f"{cpus} CPUs available, other processes using {busy:.1f}"
