"""Where the comparison ran: CPU count and model, OS, torch version."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the comparison ran: CPU count and model, OS, torch version."""
    return {
        "cpus": os.cpu_count(),
        "processor": _cpu_model(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
