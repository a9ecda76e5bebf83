"""Fault injection for the reliability tests. GENRECAL_KILL_AT="<point>" makes the process SIGKILL itself when it
reaches that point (a crash, an OOM kill); GENRECAL_ENOSPC_AT="<point>" raises ENOSPC there (a full disk).
Unset (always, outside tests) they do nothing."""

from __future__ import annotations

import errno
import os
import signal


def fault_point(point: str) -> None:
    if os.environ.get("GENRECAL_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("GENRECAL_ENOSPC_AT") == point:
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
