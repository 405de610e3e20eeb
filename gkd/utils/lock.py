"""One run at a time per run directory: an OS file lock (``filelock``), refused naming the holder.

The lock is an ``flock`` on ``DIR/.lock``: the kernel releases it when the holding process dies, even by
``kill -9``, so a stale lock never blocks a re-run. The holder's PID, host and command are written beside
it (``DIR/.lock.owner``) only to name it in the refusal.

A busy directory is refused at once unless ``$GKD_LOCK_TIMEOUT`` gives seconds to wait for it (e.g. while the
ranks of a killed launcher are still exiting). On a shared file system the lock holds across nodes where
``flock`` does (Linux NFS clients emulate it with NFS byte-range locks, which need a lock manager: NFSv4 or
``lockd``); where the file system has no locks (NFS mounted ``nolock``, Lustre without ``-o flock``) taking
it fails with an error saying so.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from gkd.utils.errors import NotWritableError, RunDirBusyError, user_error_for_write

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
LOCK_TIMEOUT_ENV = "GKD_LOCK_TIMEOUT"
_NO_LOCKS_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}


def lock_timeout() -> float:
    """Seconds to wait for a busy run directory: ``$GKD_LOCK_TIMEOUT``, else 0 (refuse at once)."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "0")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={text!r}: expected a number of seconds >= 0")
    return seconds


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds the run directory's lock, or raises `RunDirBusyError` after
    ``timeout`` seconds (default `lock_timeout`)."""

    def __init__(self, run_dir: str | Path, timeout: float | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.timeout = lock_timeout() if timeout is None else timeout
        self.lock = FileLock(self.run_dir / LOCK_FILE, timeout=self.timeout)

    def __enter__(self) -> RunDirLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except Timeout:
            waited = f"waited {self.timeout:g} s for it" if self.timeout else f"set {LOCK_TIMEOUT_ENV}=SECONDS to wait"
            raise RunDirBusyError(
                f"{self.run_dir} is in use by another run ({self._holder()}); wait for it to finish, stop it, "
                f"or use another --out ({waited})"
            ) from None
        except OSError as error:
            if error.errno in _NO_LOCKS_ERRNOS:
                raise NotWritableError(
                    f"{self.run_dir / LOCK_FILE}: this file system does not support file locks ({error.strerror}; "
                    "NFS mounted nolock, Lustre without -o flock): use a run directory on a file system with locks"
                ) from error
            raise user_error_for_write(error, self.run_dir / LOCK_FILE) or error from error
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": sys.argv}
        (self.run_dir / OWNER_FILE).write_text(json.dumps(owner) + "\n")
        return self

    def _holder(self) -> str:
        try:
            owner = json.loads((self.run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return "PID unknown"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
        return f"PID {owner.get('pid')} on {owner.get('host')}, since {started}"

    def __exit__(self, *exc_info: object) -> None:
        (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
        self.lock.release()
