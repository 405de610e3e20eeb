"""Child processes that end with their parent: pool workers and torchrun ranks must not train on as orphans."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies, even by SIGKILL (Linux; a no-op
    elsewhere). No library exposes ``prctl(PR_SET_PDEATHSIG)``, hence ctypes.

    A parent that died before the call is caught too: the process then signals itself.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    if ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # re-parented between the two calls: the signal will never come
        os.kill(os.getpid(), signum)
