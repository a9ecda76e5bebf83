"""What a stage writes, atomically: `final/` (the student with `save_pretrained` and its processor, the
Recalibrator) and `checkpoint/` (the same plus `trainer_state.pt`: step, optimizer, every rank's data position and
random generators, the run's identity), each built in a `.tmp` folder and renamed into place, so a crash never
leaves a half-written one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrecal_cache.core.durable import fsync, fsync_tree
from genrecal_cache.core.faults import fault_point

STATE_FILE = "trainer_state.pt"


def atomic_dir(final: Path) -> Path:
    """A fresh, empty `final.tmp` to build `final` in."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`: final -> final.old, tmp -> final, drop final.old (see `committed`). Everything in
    `tmp` is on disk before the renames, and the renames are before this returns (a power loss keeps one whole)."""
    fsync_tree(tmp)
    fault_point(f"checkpoint-commit:{final.name}")
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    fsync(final.parent)
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


def rng_state(cuda: bool) -> dict[str, Any]:
    """Every generator a step may draw from (dropout, sampling): Python's, numpy's, torch's CPU generator and, with
    `cuda`, every CUDA device's; in types `read_state` loads (`weights_only`)."""
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
            "cuda": torch.cuda.get_rng_state_all() if cuda else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state` returned (CUDA generators only as far as this machine has devices)."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(s, i)
