"""The set-up of the interrupt-and-resume tests: the tiny recipe's teacher trained, then distillation made to
stop at a chosen step (by Ctrl-C, a kill, ...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gkd.cli import main
from gkd.compress.objectives import DistillObjective
from tests.helpers.paths import TINY_RECIPE


@dataclass
class DistillCalls:
    """How many times ``DistillObjective.forward`` ran (set ``count`` to 0 before a re-run), and whether the
    interrupting action has run."""

    count: int = 0
    interrupted: bool = False


def train_teacher_and_arm_interrupt(
    out: Path, monkeypatch: pytest.MonkeyPatch, interrupt: Callable[[], None], at_call: int
) -> DistillCalls:
    """Train the tiny recipe's teacher into ``out``, then make call ``at_call`` of ``DistillObjective.forward``
    run ``interrupt`` before its step, once: later calls (a re-run's) are only counted.

    Args:
        out: the run directory.
        monkeypatch: the test's, so that ``forward`` is restored after it.
        interrupt: the interrupting action; if it returns (as after sending SIGINT) the step goes on.
        at_call: which call (counted from 1 over the whole distill stage) interrupts.

    Returns:
        The counter of ``forward`` calls.
    """
    assert main(["train-teacher", str(TINY_RECIPE), "--out", str(out), "--device", "cpu"]) == 0
    original = DistillObjective.forward
    calls = DistillCalls()

    def interrupting_forward(self: DistillObjective, batch: dict) -> dict[str, torch.Tensor]:
        calls.count += 1
        if calls.count == at_call and not calls.interrupted:
            calls.interrupted = True
            interrupt()
        return original(self, batch)

    monkeypatch.setattr(DistillObjective, "forward", interrupting_forward)
    return calls
