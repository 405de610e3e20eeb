"""Atomic writes: a file appears complete under its name or not at all (temp file + ``os.replace``)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def torch_save(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as temp:
        torch.save(obj, temp)


def save_state_dict(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """safetensors file with JSON-encoded metadata values (safetensors metadata is str -> str)."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=meta)


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a file written by `save_state_dict`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with safe_open(str(path), framework="pt") as handle:
        metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
    return load_file(str(path)), metadata
