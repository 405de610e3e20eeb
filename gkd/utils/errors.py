"""Errors a user can act on, each with its own exit code, and the translation of low-level failures
(a full disk, a read-only directory, a truncated file) into them.

The CLI prints such an error as one line (what, which file, what to do) and exits with its code; a
traceback is printed only with ``--debug``. Exit codes:

====  ==========================================================================
1     a check failed (an exported artifact lost accuracy)
2     bad input: the recipe, the data, the model shapes, the weights given
3     the run directory is in use by another run
4     the disk is full
5     a directory or file cannot be written (read-only, permissions)
6     a file in the run directory is corrupt or truncated (a checkpoint, a segmentor file)
7     the requested device is not available
8     a dependency is missing (TensorRT or a CUDA device for ``gkd-compress engine``); the message says what to install
130   interrupted (Ctrl-C); completed stages and checkpoints are kept
====  ==========================================================================
"""

from __future__ import annotations

import errno
from pathlib import Path

EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2
EXIT_BUSY = 3
EXIT_DISK_FULL = 4
EXIT_NOT_WRITABLE = 5
EXIT_CORRUPT_FILE = 6
EXIT_NO_DEVICE = 7
EXIT_MISSING_DEPENDENCY = 8
EXIT_INTERRUPTED = 130

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """An error with a message for the user and the exit code the CLI returns for it."""

    exit_code = EXIT_BAD_INPUT


class InputCheckError(UserError):
    """The pre-flight check found problems; the message lists all of them."""


class RunDirBusyError(UserError):
    exit_code = EXIT_BUSY


class DiskFullError(UserError):
    exit_code = EXIT_DISK_FULL


class NotWritableError(UserError):
    exit_code = EXIT_NOT_WRITABLE


class CorruptFileError(UserError):
    exit_code = EXIT_CORRUPT_FILE


class DeviceUnavailableError(UserError, RuntimeError):
    exit_code = EXIT_NO_DEVICE


class MissingDependencyError(UserError, RuntimeError):
    """A library or device the command needs is not on this machine; the message says what to install."""

    exit_code = EXIT_MISSING_DEPENDENCY


class TrainingInterrupted(UserError):
    """Ctrl-C during training: the checkpoint of the current step was written."""

    exit_code = EXIT_INTERRUPTED


def is_disk_full(error: BaseException) -> bool:
    """An ``OSError`` with ENOSPC/EDQUOT, or a library error whose message carries one (safetensors wraps the
    OS error in its own exception type)."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(error)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def user_error_for_write(error: BaseException, path: str | Path) -> UserError | None:
    """The `UserError` for a failed write of ``path`` (disk full, read-only, permission denied), else None."""
    if is_disk_full(error):
        return DiskFullError(
            f"disk full while writing {path}: free space on that file system (or use another --out) and re-run; "
            "completed stages and checkpoints are kept"
        )
    if isinstance(error, OSError) and error.errno in _NOT_WRITABLE_ERRNOS:
        where = error.filename or path
        return NotWritableError(f"cannot write {where} ({error.strerror}): choose a writable --out directory")
    return None
