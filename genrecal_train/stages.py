"""What one stage of `train-student` does (docs/DESIGN.md, "Stages"), decided once from the config: `StagePlan`
is the one place stage numbers are read (the trainer and the forward pass ask it), and `freeze` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Method, Stage, TrainConfig
from .lora import LoraSpec
from .models import vision_parameter_names
from .recalibrator import Recalibrator

LOSSES = ("student", "recal", "reg", "uld")  # the loss parts that carry gradient; the others are their pieces
LOSS_KEYS = (*LOSSES, "ar", "kl", "reg_ar", "reg_kl")  # every part a step (and a validation) reports


@dataclass(frozen=True)
class StagePlan:
    """Stage 1 aligns the Recalibrator (student frozen), stage 2 distils into the student (through the
    Recalibrator, or with ULD), stage 3 fine-tunes the student alone."""

    stage: int  # 1, 2 or 3: the stage's folder, metrics records and data seed
    method: Method
    alone: bool  # run on its own (`--stage k`), not as part of `--stage all`
    trains_student: bool  # the student trains with its own loss L_s (stages 2-3); else its forward runs without grad
    uses_recalibrator: bool  # GenRecal's stages 1-2
    new_recalibrator: bool  # the Recalibrator starts fresh (stage 1); else from stage 1's (stage 2)
    trains_recalibrator: bool  # unless stage 2 runs with --freeze-recalibrator
    regularizer: bool  # the teacher-only path: --regularizer, with a Recalibrator that trains (needs question features)
    uld: bool  # ULD distils, with no Recalibrator (--method uld, stage 2)
    lora: LoraSpec | None  # adapters on the student (--lora-rank, the stages that train it)
    from_previous_student: bool  # run alone, starts from the previous stage's student when there is one (stage 3)

    @property
    def losses(self) -> tuple[str, ...]:
        """The loss parts this stage trains with, of `LOSSES` (the regularizer's is skipped by a store without
        question features)."""
        applies = {"student": self.trains_student, "recal": self.uses_recalibrator, "reg": self.regularizer,
                   "uld": self.uld}
        return tuple(k for k in LOSSES if applies[k])

    @classmethod
    def of(cls, cfg: TrainConfig, stage: int) -> StagePlan:
        """Stage `stage` (1, 2 or 3) of the run `cfg` describes."""
        return cls.make(stage, cfg.method, freeze_recalibrator=cfg.freeze_recalibrator, regularizer=cfg.regularizer,
                        lora=cfg.lora, alone=cfg.stage != Stage.all)

    @classmethod
    def make(cls, stage: int, method: Method = Method.genrecal, *, freeze_recalibrator: bool = False,
             regularizer: bool = True, lora: LoraSpec | None = None, alone: bool = False) -> StagePlan:
        """The table of what each stage number means."""
        trains_student = stage in (2, 3)
        uses_recal = stage in (1, 2) and method == Method.genrecal
        trains_recal = uses_recal and not (stage == 2 and freeze_recalibrator)
        return cls(stage=stage, method=method, alone=alone, trains_student=trains_student,
                   uses_recalibrator=uses_recal, new_recalibrator=uses_recal and stage == 1,
                   trains_recalibrator=trains_recal, regularizer=bool(regularizer and trains_recal),
                   uld=method == Method.uld and stage == 2, lora=lora if trains_student else None,
                   from_previous_student=alone and stage == 3)


def freeze(student: torch.nn.Module, recal: Recalibrator | None, stage: StagePlan | int, train_vision: bool,
           freeze_recalibrator: bool = False) -> None:
    """What `stage` (its plan, or a GenRecal stage's number with `freeze_recalibrator`) trains: stage 1 the
    Recalibrator only; stage 2 the student (vision tower frozen unless `train_vision`) and the Recalibrator
    (unless frozen); stage 3 the student alone."""
    plan = stage if isinstance(stage, StagePlan) else StagePlan.make(stage, freeze_recalibrator=freeze_recalibrator)
    frozen_vision = set() if train_vision else vision_parameter_names(student)
    for n, p in student.named_parameters():
        p.requires_grad_(plan.trains_student and n not in frozen_vision)
    if recal is not None:
        for p in recal.parameters():
            p.requires_grad_(plan.trains_recalibrator)
