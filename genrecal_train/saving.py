"""Saving a stage (every rank calls, rank 0 writes): its `checkpoint/` for exact resume and its `final/` (the
student with any LoRA adapters merged, the Recalibrator), with full state dicts gathered from FSDP shards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, dist, lora
from .stage_models import StageModels


def model_states(m: StageModels, fsdp: bool) -> dict[str, dict[str, torch.Tensor] | None]:
    """Under FSDP, the student's and the Recalibrator's full state dicts gathered on rank 0 (every rank must
    call it); without, None for each (the modules hold every weight: they are saved as they are)."""
    if not fsdp:
        return {"student": None, "recal": None}
    full = dist.full_state_dict(m.models)
    return {name: {k[len(name) + 1 :]: v for k, v in full.items()
                   if k.startswith(name + ".") and k[len(name) + 1 :] not in m.tied}
            for name in ("student", "recal")}


def save_checkpoint(folder: Path, m: StageModels, fsdp: bool, main: bool,
                    state: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """`folder` (a stage's checkpoint/), atomically: the student (or, under LoRA, its adapter: the student it
    adapts is the state's `lora_base`), the processor, the Recalibrator, and `state(optimizer state)` (keyed by
    parameter name, with or without FSDP), which rank 0 calls once the states are gathered."""
    states, optimizer = model_states(m, fsdp), dist.optimizer_state(m.models, m.opt)
    if main:
        tmp = checkpoint.atomic_dir(folder)
        if m.peft is not None:
            lora.save_adapter(m.peft, tmp / lora.ADAPTER_DIR)
            checkpoint.save_models(tmp, None, m.processor, m.recal, states)
        else:
            checkpoint.save_models(tmp, m.student, m.processor, m.recal, states)
        checkpoint.write_state(tmp, state(optimizer))
        checkpoint.commit_dir(tmp, folder)
    dist.barrier()  # nobody moves on (or reads it) before it is complete


def save_final(folder: Path, m: StageModels, fsdp: bool, main: bool, dtype: torch.dtype, save_adapter: bool
               ) -> Path:
    """`folder` (a stage's final/), atomically: the student, LoRA adapters merged into it in `dtype` (with
    `save_adapter` the adapter too), its processor and the Recalibrator. Merging removes the adapters: save the
    checkpoint first."""
    states = model_states(m, fsdp)
    if main:
        tmp = checkpoint.atomic_dir(folder)
        student = m.student
        if m.peft is not None:
            if save_adapter:
                lora.save_adapter(m.peft, tmp / lora.ADAPTER_DIR)
            student = lora.merged(m.peft, dtype)
        checkpoint.save_models(tmp, student, m.processor, m.recal, states)
        checkpoint.commit_dir(tmp, folder)
    dist.barrier()
    return folder
