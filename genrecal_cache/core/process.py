"""Processes that must not outlive the one that started them (render workers, trainer data workers, a part's
job under Ray): Linux's PR_SET_PDEATHSIG, in one place; and whether a pid still runs (`alive`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the thread that started it ends. A parent killed with SIGKILL (or by the
    out-of-memory killer) would otherwise leave it behind, holding memory, locks and pipes nobody reads."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() == 1:  # the parent died before the line above
        os._exit(1)


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True
