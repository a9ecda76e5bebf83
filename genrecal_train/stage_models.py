"""What a stage trains, set up as its plan says: the student (LoRA adapters attached under --lora-rank) and its
Recalibrator (new, stage 1's or resumed), frozen, under one DDP/FSDP root, with AdamW over what trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genrecal_cache.core.errors import ConfigError

from . import dist, lora
from .config import TrainConfig
from .models import (
    check_recalibrator,
    describe_groups,
    find_recalibrator,
    fsdp_units,
    load_student,
    new_recalibrator,
    parameter_groups,
)
from .recalibrator import Recalibrator
from .stages import StagePlan, freeze


@dataclass
class StageModels:
    """The stage's models. Every pass over the student or the Recalibrator runs as `model(fn, ...)`, through DDP
    or FSDP under torchrun; `models` is the bare root (state dicts, optimizer state), its keys those of one
    process."""

    student: torch.nn.Module
    processor: Any
    recal: Recalibrator | None
    peft: Any  # the PEFT wrapper of `student` (whose layers it changed in place) under --lora-rank, else None
    models: dist.Models
    model: torch.nn.Module
    tied: set[str]  # second names of tied weights (the LM head tied to the embeddings): save_pretrained omits them
    opt: torch.optim.Optimizer


def setup_models(cfg: TrainConfig, plan: StagePlan, saved: Path | None, student_from: str | None,
                 teacher: dict[str, Any], device: torch.device, folder: Path, main: bool) -> StageModels:
    """Student and Recalibrator from the checkpoint being resumed (`saved`), else from `student_from` (the
    previous stage) or --student; frozen for the stage, wrapped for DDP/FSDP; the optimizer over the rest.
    `teacher`: the store's teacher; `folder`: the stage's output folder; `main`: this is rank 0."""
    loaded = load_student(str(saved / "student") if saved and not plan.lora else (student_from or cfg.student),
                          device, cfg.gradient_checkpointing, trust_remote_code=cfg.trust_remote_code,
                          processor_kwargs=cfg.processor_kwargs_map)
    student = loaded.model
    recal = load_recalibrator(cfg, plan, saved, student.config, teacher, device) if plan.uses_recalibrator else None
    if plan.new_recalibrator and saved is None and main:  # the start, for inspect-cache --plot (before FSDP)
        recal.save(folder / "init" / "recalibrator")
    freeze(student, recal, plan, cfg.train_vision)
    peft = None
    if plan.lora:
        peft = lora.attach(student, plan.lora)
        if saved:
            lora.load_adapter(peft, saved / lora.ADAPTER_DIR)
        if device.type == "cuda":
            lora.frozen_linears_to(student, torch.bfloat16)
    if main:
        print(f"train-student stage {plan.stage}: {describe_groups(parameter_groups(student, recal))}", flush=True)
    models = dist.Models(student=student, recal=recal)
    tied = ({n for n, _ in student.named_parameters(remove_duplicate=False)}
            - {n for n, _ in student.named_parameters()})
    model = dist.wrap(models, cfg.fsdp, fsdp_units(student, recal) if cfg.fsdp else [])
    params = [p for p in models.parameters() if p.requires_grad]  # after FSDP swapped in its shards
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return StageModels(student, loaded.processor, recal, peft, models, model, tied, opt)


def load_recalibrator(cfg: TrainConfig, plan: StagePlan, saved: Path | None, student_config: Any,
                      teacher: dict[str, Any], device: torch.device) -> Recalibrator:
    """From the checkpoint being resumed (`saved`), from stage 1 (stage 2), or new (stage 1); checked against
    the store's teacher and the student."""
    if saved is not None:
        recal = Recalibrator.load(saved / "recalibrator")
    elif not plan.new_recalibrator:
        own = cfg.output / "stage1" / "final"  # --stage all: the Recalibrator stage 1 just trained
        src = (cfg.recalibrator or own) if plan.alone else own
        try:
            recal = Recalibrator.load(find_recalibrator(src))
        except ConfigError:
            raise ConfigError(f"stage 2 needs a stage-1 Recalibrator; none at {src} (run `train-student "
                              "--stage 1` first, or pass --recalibrator DIR)") from None
    else:
        recal = new_recalibrator(student_config, teacher, cfg.recalibrator_layers, cfg.new_positions,
                                 cfg.answer_inputs)
    check_recalibrator(recal, teacher, student_config, cfg.answer_inputs)
    return recal.to(device, torch.float32).train()
