"""Paired, interleaved latency: runtimes timed round-robin in one process, so they can be compared on a shared CPU.

Timing each runtime in its own block lets drift and other processes' load land on one runtime and not the
next (identical graphs differed by 1.4x between blocks on a loaded machine). Here every runtime is warmed up,
then round ``r`` times each once in a fixed order (A B C A B C ...), so a burst of load hits neighbouring
calls of all of them. Each runtime is summarised by min / median / p90 and its spread, and against a
reference by the per-round paired ratio ``t(runtime, r) / t(reference, r)`` (below 1: faster), whose median
is robust to a round that a burst slowed down for everyone. The caller pins the threads (torch's intra-op
threads, which ONNX Runtime sessions copy when created); the count is recorded. Other processes' CPU use
(`gkd.utils.cpu`) is sampled before and after and measured over the timed rounds; the result is marked
``machine_busy`` when any of the three competed with our threads. Python's garbage collector is paused
while timing so that its pauses fall on no runtime.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from gkd.utils.cpu import OtherLoad, available_cpus, machine_busy, others_busy_cpus

log = logging.getLogger("gkd")

PAIRED_NOTE = (
    "runtimes timed round-robin (A B C A B C ...) in one process after each one's warm-up; spread = "
    "(p90 - p10) / median; ratio = median over rounds of t(runtime) / t(reference) in the same round (below 1: "
    "faster); other_cpus: CPUs other processes used before, during and after the rounds"
)


def spread_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Milliseconds: min / p10 / median / p90 / IQR, and the relative spread ``(p90 - p10) / median``."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p10, p25, median, p75, p90 = np.percentile(ms, [10, 25, 50, 75, 90])
    return {
        "min_ms": float(ms.min()),
        "p10_ms": float(p10),
        "median_ms": float(median),
        "p90_ms": float(p90),
        "iqr_ms": float(p75 - p25),
        "spread": float((p90 - p10) / median) if median > 0 else float("nan"),
    }


def paired_ratio(seconds: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Per-round ratios ``seconds[r] / reference[r]``: their median, p10, p90 and ``(p90 - p10) / median``."""
    ratios = np.asarray(seconds, dtype=np.float64) / np.asarray(reference, dtype=np.float64)
    p10, median, p90 = np.percentile(ratios, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "spread": float((p90 - p10) / median)}


def _summary(seconds: Sequence[float], reference: Sequence[float], batch_size: int) -> dict:
    """One runtime's `spread_stats`, images per second at its median, and its `paired_ratio` to the reference."""
    stats = spread_stats(seconds)
    return {**stats, "images_per_s": batch_size * 1e3 / stats["median_ms"], "ratio": paired_ratio(seconds, reference)}


def _other_cpus(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def time_interleaved(
    runs: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup_iterations: int = 5,
    reference: str | None = None,
    batch_size: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Time every callable of ``runs`` once per round, round-robin, for ``rounds`` rounds after a warm-up.

    Args:
        runs: ``{name: call}``; each call runs one batch and waits for the device to finish.
        rounds: timed rounds (each runtime is timed once per round).
        warmup_iterations: untimed calls of each runtime, one runtime after the other, before the rounds.
        reference: the runtime the others are compared with (default: the first).
        batch_size: images per call (for images per second).
        clock: seconds (a fake one in tests).
    """
    if rounds < 1 or not runs:
        raise ValueError("time_interleaved needs at least one runtime and one round")
    reference = next(iter(runs)) if reference is None else reference
    if reference not in runs:
        raise ValueError(f"reference {reference!r} is not among the runtimes {list(runs)}")
    threads = torch.get_num_threads()
    before = others_busy_cpus()
    for run in runs.values():
        for _ in range(warmup_iterations):
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    gc.collect()
    gc.disable()
    others = OtherLoad().start()
    try:
        for _ in range(rounds):
            for name, run in runs.items():
                start = clock()
                run()
                seconds[name].append(clock() - start)
    finally:
        gc.enable()
    during = others.stop()
    after = others_busy_cpus()
    busy = any(machine_busy(load, threads) for load in (before, during, after))
    if busy:
        log.warning(
            "interleaved latency measured while other processes used %s of %d CPUs (before / during / after)",
            " / ".join("?" if load is None else f"{load:.1f}" for load in (before, during, after)), available_cpus(),
        )  # fmt: skip
    runtimes = {name: _summary(times, seconds[reference], batch_size) for name, times in seconds.items()}
    return {
        "batch_size": batch_size,
        "rounds": rounds,
        "warmup_iterations": warmup_iterations,
        "order": list(runs),
        "reference": reference,
        "threads": threads,
        "other_cpus": {"before": _other_cpus(before), "during": _other_cpus(during), "after": _other_cpus(after)},
        "machine_busy": busy,
        "runtimes": runtimes,
    }
