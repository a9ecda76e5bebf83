"""A stage's metrics: one JSON line per record in `metrics.jsonl` (TensorBoard too, when installed), written by
rank 0 only. On resume, lines logged after the checkpoint are dropped: those steps run again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _tensorboard(path: Path) -> Any:
    """A TensorBoard writer when tensorboard is installed, else None (metrics.jsonl has everything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class MetricsLog:
    """`log(record)` appends a record of stage `stage`; a no-op where `enabled` is False (ranks other than 0)."""

    def __init__(self, folder: Path, stage: int, enabled: bool, resumed_at: int | None = None):
        self.stage = stage
        self.file = self.tensorboard = None
        if not enabled:
            return
        log = folder / "metrics.jsonl"
        kept = []
        if resumed_at is not None and log.exists():
            kept = [ln for ln in log.read_text().splitlines() if _step_of(ln) <= resumed_at]
        log.write_text("".join(ln + "\n" for ln in kept))
        self.file = log.open("a")
        self.tensorboard = _tensorboard(folder / "tensorboard")

    def log(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if k not in ("stage", "step") and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(f"stage{self.stage}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
