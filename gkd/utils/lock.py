"""One run at a time per run directory: an OS file lock (``filelock``), refused naming the holder.

The lock is an ``flock`` on ``DIR/.lock``: the kernel releases it when the holding process dies, even by
``kill -9``, so a stale lock never blocks a re-run. The holder's PID, host and command are written beside
it (``DIR/.lock.owner``) only to name it in the refusal.

A busy directory is refused at once unless ``$GKD_LOCK_TIMEOUT`` gives seconds to wait for it (e.g. while the
ranks of a killed launcher are still exiting). A rank that torchrun restarted (``--max-restarts``) waits
`RESTART_LOCK_WAIT_S` by default: the killed attempt's processes (and the loader workers they forked, which
share the lock) may still be exiting. On a shared file system the lock holds across nodes where
``flock`` does (Linux NFS clients emulate it with NFS byte-range locks, which need a lock manager: NFSv4 or
``lockd``); where the file system has no locks (NFSv3 without ``lockd``, Lustre without ``-o flock``) taking
it fails with an error saying so. NFS mounted ``nolock`` and Lustre mounted ``-o localflock`` lock within one
node only: runs started on different nodes are then not kept apart.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from gkd.utils.errors import NotWritableError, RunDirBusyError, user_error_for_write

log = logging.getLogger("gkd")

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
LOCK_TIMEOUT_ENV = "GKD_LOCK_TIMEOUT"
RESTART_LOCK_WAIT_S = 60.0
_NO_LOCKS_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}


def lock_timeout() -> float:
    """Seconds to wait for a busy run directory: ``$GKD_LOCK_TIMEOUT``, else 0 (refuse at once), or
    `RESTART_LOCK_WAIT_S` in a process torchrun restarted."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    text = os.environ.get(LOCK_TIMEOUT_ENV, str(RESTART_LOCK_WAIT_S if restarted else 0))
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
            self._acquire()
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
                    "NFSv3 without lockd, Lustre without -o flock): use a run directory on a file system with locks"
                ) from error
            raise user_error_for_write(error, self.run_dir / LOCK_FILE) or error from error
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": sys.argv}
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank: the job, and which of its attempts
            owner["torchrun"] = {
                "run_id": os.environ["TORCHELASTIC_RUN_ID"],
                "attempt": os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
            }
        (self.run_dir / OWNER_FILE).write_text(json.dumps(owner) + "\n")
        return self

    def _acquire(self) -> None:
        """Take the lock; a busy one is waited for (at most ``timeout``) only after saying whose it is."""
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            if not self.timeout:
                raise
            log.warning("waiting up to %g s for the lock of %s (%s)", self.timeout, self.run_dir, self._holder())
            self.lock.acquire()

    def _holder(self) -> str:
        try:
            owner = json.loads((self.run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return "PID unknown"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
        job = owner.get("torchrun")
        of_job = f", rank 0 of torchrun job {job['run_id']} attempt {job['attempt']}" if job else ""
        return f"PID {owner.get('pid')} on {owner.get('host')}{of_job}, since {started}"

    def __exit__(self, *exc_info: object) -> None:
        (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
        self.lock.release()
