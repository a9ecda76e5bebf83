"""The models a stage trains: the student (loaded like every model here, through `genrecal_cache.core.models`), the
Recalibrator (new, from stage 1, or from a checkpoint, checked against the store's teacher), the parameter groups
a stage trains or freezes (stages.py decides which), and what FSDP shards on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genrecal_cache.core.errors import ConfigError
from genrecal_cache.core.models import LoadedModel, load_model

from .recalibrator import AnswerInputs, Recalibrator, RecalibratorConfig

VISION_MODULES = ("vision_tower", "vision_model", "visual", "image_encoder")
# Projectors between the vision encoder and the language model; Qwen2-VL keeps its `merger` inside `visual`. They
# train with the language model (the method freezes the vision encoder only).
PROJECTORS = ("merger", "multi_modal_projector", "connector", "mm_projector")
_CONFIG = "recalibrator.json"


def load_student(path: str, device: torch.device, gradient_checkpointing: bool = False,
                 flag: str = "--student", trust_remote_code: bool = False, processor_kwargs: dict | None = None
                 ) -> LoadedModel:
    """The student in fp32 (master weights) on `device`, in train mode."""
    loaded = load_model(path, dtype=torch.float32, device=device, flag=flag, trust_remote_code=trust_remote_code,
                        processor_kwargs=processor_kwargs)
    if gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable()
    loaded.model.train()  # from_pretrained returns eval mode (no dropout, no gradient checkpointing)
    return loaded


def find_recalibrator(path: Path | str, flag: str = "--recalibrator") -> Path:
    """The folder holding recalibrator.json: `path` itself, its `recalibrator/` subfolder (a stage's `final/`
    or `init/`), or `final/recalibrator/` of a stage folder."""
    path = Path(path)
    for candidate in (path, path / "recalibrator", path / "final" / "recalibrator"):
        if (candidate / _CONFIG).is_file():
            return candidate
    raise ConfigError(f"{flag} {path}: no Recalibrator there (expected a train-student stage folder such as "
                      "run/stage1/final, or its recalibrator/ subfolder, holding recalibrator.json)")


def new_recalibrator(student_config: Any, teacher: dict[str, Any], num_layers: int, new_positions: bool,
                     answer_inputs: AnswerInputs) -> Recalibrator:
    """A fresh Recalibrator for this student and the store's teacher (stage 1)."""
    return Recalibrator(RecalibratorConfig.from_student(
        student_config, teacher["hidden_size"], num_layers=num_layers, new_positions=new_positions,
        answer_inputs=answer_inputs,
        teacher={k: teacher.get(k) for k in ("name_or_path", "vocab_size", "head_digest")}))


def check_recalibrator(recal: Recalibrator, teacher: dict[str, Any], student_config: Any,
                       answer_inputs: AnswerInputs) -> None:
    """Refuse a Recalibrator trained for another teacher, another student width or other answer inputs."""
    trained_for = recal.cfg.teacher
    for key in ("vocab_size", "head_digest"):
        if trained_for.get(key) is not None and trained_for[key] != teacher.get(key):
            raise ConfigError(f"the Recalibrator was trained for teacher {trained_for.get('name_or_path')!r} "
                              f"({key} differs from this store's teacher {teacher.get('name_or_path')!r}); "
                              "train stage 1 on this store")
    if recal.cfg.answer_inputs != answer_inputs:
        raise ConfigError(f"the Recalibrator was trained with --answer-inputs {recal.cfg.answer_inputs}, this run "
                          f"asks for {answer_inputs}: pass --answer-inputs {recal.cfg.answer_inputs}")
    if recal.cfg.teacher_hidden != teacher["hidden_size"]:
        raise ConfigError(f"the Recalibrator maps to width {recal.cfg.teacher_hidden}, the store's teacher has "
                          f"{teacher['hidden_size']}: it was trained for another teacher")
    width = student_config.get_text_config().hidden_size
    if recal.cfg.student_hidden != width:
        raise ConfigError(f"the Recalibrator expects student width {recal.cfg.student_hidden}, the student has "
                          f"{width}")


def under(name: str, modules: tuple[str, ...]) -> bool:
    """Whether parameter (or module, with a trailing dot) `name` lies inside one of `modules`."""
    return any(f".{m}." in f".{name}" for m in modules)


def vision_parameter_names(model: torch.nn.Module) -> set[str]:
    """The vision encoder's parameters (frozen in stages 2-3 unless --train-vision); projectors are not."""
    return {n for n, _ in model.named_parameters() if under(n, VISION_MODULES) and not under(n, PROJECTORS)}


def parameter_groups(student: torch.nn.Module, recal: torch.nn.Module | None) -> dict[str, tuple[int, int]]:
    """(trainable, frozen) parameter counts of the vision encoder, the projector, the language model, LoRA
    adapters (--lora-rank) and the Recalibrator, as the stage set them."""
    groups: dict[str, list[int]] = {}
    named = [(n, p) for n, p in student.named_parameters()] + [
        (f"recalibrator.{n}", p) for n, p in (recal.named_parameters() if recal is not None else [])]
    for n, p in named:
        group = ("Recalibrator" if n.startswith("recalibrator.") else "LoRA adapters" if ".lora_" in n
                 else "projector" if under(n, PROJECTORS)
                 else "vision encoder" if under(n, VISION_MODULES) else "language model")
        counts = groups.setdefault(group, [0, 0])
        counts[0 if p.requires_grad else 1] += p.numel()
    return {k: (v[0], v[1]) for k, v in groups.items()}


def describe_groups(groups: dict[str, tuple[int, int]]) -> str:
    def m(n: int) -> str:
        return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)

    return ", ".join(f"{g} {m(t)} trained / {m(f)} frozen" for g, (t, f) in groups.items())


def fsdp_units(student: torch.nn.Module, recal: Recalibrator | None) -> list[torch.nn.Module]:
    """What FSDP shards on its own: the student's decoder layers (the blocks transformers never splits,
    `_no_split_modules`, outside the vision tower, which some batches skip) and the Recalibrator's blocks."""
    names = {n for m in student.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    units = [m for n, m in student.named_modules()
             if type(m).__name__ in names and not any(f".{v}." in f".{n}." for v in VISION_MODULES)]
    return units + ([*recal.blocks, recal] if recal is not None else [])
