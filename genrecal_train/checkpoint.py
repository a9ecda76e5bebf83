"""What a stage writes, atomically: `final/` (the student with `save_pretrained` and its processor, the
Recalibrator) and `checkpoint/` (the same plus `trainer_state.pt`: step, optimizer, every rank's data position,
RNG), each built in a `.tmp` folder and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"


def atomic_dir(final: Path) -> Path:
    """A fresh, empty `final.tmp` to build `final` in."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`: final -> final.old, tmp -> final, drop final.old (see `committed`)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def committed(final: Path) -> Path:
    """`final`, or `final.old` when a crash fell between `commit_dir`'s two renames."""
    old = final.with_name(final.name + ".old")
    return old if not final.exists() and old.exists() else final


def save_models(out: Path, student: Any, processor: Any, recal: Any | None,
                states: dict[str, dict[str, torch.Tensor] | None]) -> None:
    """`out/student` (loads with transformers, serves with vLLM; only the processor when `student` is None) and
    `out/recalibrator`; `states` replace the modules' own state dicts where given (full ones gathered from FSDP
    shards)."""
    if student is not None:
        student.save_pretrained(out / "student", state_dict=states["student"])
    processor.save_pretrained(out / "student")
    if recal is not None:
        recal.save(out / "recalibrator", states["recal"])


def has_state(folder: Path) -> bool:
    return (folder / STATE_FILE).exists()


def write_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / STATE_FILE)


def read_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
