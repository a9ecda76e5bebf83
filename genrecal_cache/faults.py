"""Fault injection for the reliability tests: GENRECAL_KILL_AT="<point>" makes the process SIGKILL itself when
it reaches that point, as a crash or an OOM kill would. Unset (always, outside tests) it does nothing."""

from __future__ import annotations

import os
import signal


def fault_point(point: str) -> None:
    if os.environ.get("GENRECAL_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
