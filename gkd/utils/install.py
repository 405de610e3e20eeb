"""Checks of how the runtime packages are installed.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same import package, ``onnxruntime``: with both
installed, whichever pip wrote last wins, and a CPU-only wheel can silently hide the CUDA execution provider.
gkd-compress therefore never depends on both (``pip install 'gkd-compress[cpu]'`` or ``'[gpu]'``) and says
at start-up which one to remove when an environment holds both.
"""

from __future__ import annotations

from importlib import metadata

ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def installed_distributions(names: tuple[str, ...] = ONNXRUNTIME_DISTRIBUTIONS) -> list[str]:
    """Which of ``names`` are installed (pip distribution names)."""
    installed = []
    for name in names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        installed.append(name)
    return installed


def onnxruntime_install_problem(gpu: bool) -> str | None:
    """A message when ONNX Runtime is installed twice (or not at all), naming what to uninstall; else None.

    Args:
        gpu: whether this machine has a CUDA GPU (then the GPU package is the one to keep).
    """
    installed = installed_distributions()
    if not installed:
        return (
            "ONNX Runtime is not installed: the ONNX files are written but their parity and latency are not "
            "checked. pip install 'gkd-compress[cpu]' (or '[gpu]' on a CUDA machine)"
        )
    if len(installed) < 2:
        return None
    keep, remove = ("onnxruntime-gpu", "onnxruntime") if gpu else ("onnxruntime", "onnxruntime-gpu")
    return (
        "both onnxruntime and onnxruntime-gpu are installed; they share one import package and the one installed "
        f"last wins, which can hide the CUDA provider. Keep {keep}: "
        f"pip uninstall -y {remove} {keep} && pip install {keep}"
    )
