"""Atomic writes: a file appears complete under its name or not at all (temp file + ``os.replace``), with
the permissions of an ordinary new file; a full disk or a read-only directory is a `UserError` naming the
file. Reads of corrupt files name the file, and content hashes for the stage records."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from gkd.utils.errors import CorruptFileError, DiskFullError, user_error_for_write

if TYPE_CHECKING:
    import torch

TEMP_SUFFIX = ".tmp"


def _new_file_mode() -> int:
    """0666 minus the process umask: what ``open(path, "w")`` would create (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    A full disk or an unwritable directory raises `DiskFullError` / `NotWritableError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as error:
        raise user_error_for_write(error, path) or error from error
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.chmod(temp, _new_file_mode())
        os.replace(temp, path)
    except Exception as error:
        friendly = user_error_for_write(error, path)
        if friendly is None:
            raise
        raise friendly from error
    finally:
        temp.unlink(missing_ok=True)


def require_free_space(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Stop with `DiskFullError` before work whose files would not fit: some writers (ONNX, TensorRT) abort the
    process on a full disk instead of raising."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise DiskFullError(
            f"{what} needs about {needed_bytes / 2**20:.0f} MiB free in {directory}, {free / 2**20:.0f} MiB are free: "
            "free space or use another --out, then re-run (completed stages are kept)"
        )


def remove_temporary_files(root: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_path` leaves when its process is killed (``.<name>.<random>.tmp``)
    under ``root``; call it only while holding the run directory's lock. Returns what was removed."""
    removed = []
    for temp in Path(root).rglob(f".*{TEMP_SUFFIX}"):
        if temp.is_file():
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a JSON Lines file; a line that is not JSON raises
    ``ValueError`` naming ``path:line``."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from error
    return entries


def torch_save(path: str | Path, obj: Any) -> None:
    # Through a Python file object: torch's own C++ writer reports a full disk as an opaque stream error.
    import torch  # here, not above: the JSON and hash helpers (the build engine's) import no torch

    with atomic_path(path) as temp, temp.open("wb") as handle:
        torch.save(obj, handle)


def torch_load(path: str | Path) -> Any:
    """A file written by `torch_save` (full pickle: only for the run's own checkpoints); a truncated or
    corrupt file is a `CorruptFileError` naming it."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CorruptFileError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            "delete it and re-run: the stage restarts from its previous checkpoint or from step 0"
        ) from error


def save_state_dict(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """safetensors file with JSON-encoded metadata values (safetensors metadata is str -> str)."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=meta)


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a file written by `save_state_dict`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
        return load_file(str(path)), metadata
    except (SafetensorError, json.JSONDecodeError) as error:
        raise corrupt_safetensors(path, error) from error


def corrupt_safetensors(path: str | Path, error: BaseException) -> CorruptFileError:
    """The error for a ``.safetensors`` file that does not parse (truncated by a full disk or a killed copy)."""
    return CorruptFileError(
        f"{path} is truncated or corrupt ({str(error).splitlines()[0][:160]}); delete it and re-run the stage "
        "that writes it (or copy the weights file again)"
    )


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
