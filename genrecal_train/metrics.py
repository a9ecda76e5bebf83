"""A stage's metrics: one JSON line per record in `metrics.jsonl`, and the `--report-to` trackers (tracking.py),
written by rank 0 only. On resume, lines logged after the checkpoint are dropped: those steps run again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .tracking import Tracker


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


class MetricsLog:
    """`log(record)` appends a record of stage `stage`; a no-op where `enabled` is False (ranks other than 0)."""

    def __init__(self, folder: Path, stage: int, enabled: bool, resumed_at: int | None = None,
                 trackers: Callable[[], list[Tracker]] | None = None):
        self.stage = stage
        self.file = None
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        log = folder / "metrics.jsonl"
        kept = []
        if resumed_at is not None and log.exists():
            kept = [ln for ln in log.read_text().splitlines() if _step_of(ln) <= resumed_at]
        log.write_text("".join(ln + "\n" for ln in kept))
        self.file = log.open("a")
        self.trackers = trackers() if trackers is not None else []

    def log(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        scalars = {f"stage{self.stage}/{k}": v for k, v in record.items()
                   if k not in ("stage", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers:
            t.log(scalars, record.get("step", 0))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        for t in self.trackers:
            t.close()
        self.trackers = []
