"""Fault injection for the reliability tests. GENRECAL_KILL_AT="<point>" makes the process SIGKILL itself when it
reaches that point (a crash, an OOM kill); GENRECAL_ENOSPC_AT="<point>" raises ENOSPC there (a full disk);
GENRECAL_CUDA_ERROR_AT="<point>" raises a CUDA error there (a failing device); GENRECAL_ENOSYS_AT="<point>" raises
ENOSYS there (a file system without the call, e.g. flock on Lustre); GENRECAL_HOLD_AT="<point>" blocks the thread
that reaches it for good (a commit still being written when the process dies); GENRECAL_WAIT_AT="<point>=<file>"
creates `<file>.reached` there and waits until `<file>` exists (a test does something in between: stops a server).
Unset (always, outside tests) they do nothing."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path


def fault_point(point: str) -> None:
    if os.environ.get("GENRECAL_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("GENRECAL_ENOSPC_AT") == point:
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    if os.environ.get("GENRECAL_ENOSYS_AT") == point:
        raise OSError(errno.ENOSYS, f"Function not implemented (injected at {point})")
    if os.environ.get("GENRECAL_CUDA_ERROR_AT") == point:
        raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected at {point})")
    if os.environ.get("GENRECAL_HOLD_AT") == point:
        threading.Event().wait()
    wait = os.environ.get("GENRECAL_WAIT_AT", "")
    if wait.partition("=")[0] == point:
        go = Path(wait.partition("=")[2])
        go.with_name(go.name + ".reached").touch()
        while not go.exists():
            time.sleep(0.05)
