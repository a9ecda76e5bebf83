"""LoRA students (`--lora-rank R`): PEFT adapters on the student's language-model linear layers in stages 2-3,
the projector trained in full, and at a stage's end a merged plain transformers student (`--save-adapter` also
keeps the adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genrecal_cache.core.errors import ConfigError

from .models import PROJECTORS, VISION_MODULES, under

ADAPTER_DIR = "adapter"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("--lora-rank needs PEFT: pip install -e '.[lora]' in the GenRecal clone (or pip install "
                          "peft)") from None
    return peft


@dataclass
class LoraSpec:
    """What `--lora-rank/--lora-alpha/--lora-targets` ask for. `targets`: module-name suffixes (q_proj, ...), or
    None for every linear layer of the language model."""

    rank: int
    alpha: float
    targets: tuple[str, ...] | None
    train_vision: bool = False


def target_names(model: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the linear layers that get adapters: the language model's (and the vision encoder's with
    --train-vision), never the output head or a projector (those train in full or not at all)."""
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or under(name + ".", PROJECTORS):
            continue
        if under(name + ".", VISION_MODULES) and not spec.train_vision:
            continue
        if spec.targets is None or name.rsplit(".", 1)[-1] in spec.targets:
            names.append(name)
    unknown = sorted(set(spec.targets or ()) - {n.rsplit(".", 1)[-1] for n in names})
    if not names or unknown:
        raise ConfigError(f"--lora-targets {','.join(spec.targets or ())}: no linear layer of the student is named "
                          f"{', '.join(unknown)}; name layers as the student does (e.g. q_proj,v_proj) or use "
                          "all-linear")
    return names


def attach(model: torch.nn.Module, spec: LoraSpec) -> Any:
    """Wrap `model` (changed in place: its linear layers get adapters, everything else is frozen) in a PEFT model;
    the projector, if any, trains in full and is saved with the adapter."""
    peft = _peft()
    projectors = [n for n, _ in model.named_modules()  # full names, outermost only (PEFT matches by suffix)
                  if n.rsplit(".", 1)[-1] in PROJECTORS and not under(n.rsplit(".", 1)[0] + ".", PROJECTORS)]
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                             target_modules=target_names(model, spec), modules_to_save=projectors or None)
    return peft.get_peft_model(model, config)


def save_adapter(wrapped: Any, folder: Path) -> None:
    """The adapter (and the projector) in PEFT's format: `PeftModel.from_pretrained(base, folder)` loads it."""
    wrapped.save_pretrained(folder)


def load_adapter(wrapped: Any, folder: Path) -> None:
    """Adapter weights saved by `save_adapter` back into `wrapped` (a resumed checkpoint)."""
    from safetensors.torch import load_file

    result = _peft().set_peft_model_state_dict(wrapped, load_file(folder / "adapter_model.safetensors"))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise ConfigError(f"{folder}: the adapter does not fit this student ({(result.unexpected_keys + missing)[:3]} "
                          "...); resume with the same --student and --lora-* options")


def frozen_linears_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen weights of linear layers (never the output head, tied to the embeddings in some models) in
    `dtype`: they only feed autocast matmuls, which cast them anyway. Embeddings and norms keep fp32, so the
    residual stream stays as precise as in a full fine-tune."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(dtype)


def merged(wrapped: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The plain transformers student with every adapter merged into its weights (the adapters are gone from
    `wrapped` afterwards), in `dtype`."""
    return wrapped.merge_and_unload().to(dtype)
