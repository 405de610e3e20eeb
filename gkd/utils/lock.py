"""One run at a time per run directory: an OS file lock (``filelock``), refused at once naming the holder.

The lock is an ``flock`` on ``DIR/.lock``: the kernel releases it when the holding process dies, even by
``kill -9``, so a stale lock never blocks a re-run. The holder's PID, host and command are written beside
it (``DIR/.lock.owner``) only to name it in the refusal.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from gkd.utils.errors import RunDirBusyError, user_error_for_write

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds the run directory's lock, or raises `RunDirBusyError` at once."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.lock = FileLock(self.run_dir / LOCK_FILE, timeout=0)

    def __enter__(self) -> RunDirLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except Timeout:
            raise RunDirBusyError(
                f"{self.run_dir} is in use by another run ({self._holder()}); wait for it to finish, stop it, "
                "or use another --out"
            ) from None
        except OSError as error:
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
