"""The one way this project loads a model: its processor decides the class (images: an image-text-to-text
model; text only: a causal LM), so the teacher backend, the trainer, evaluation and the plots agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .chat import load_processor
from .errors import ConfigError


@dataclass
class LoadedModel:
    """A transformers model with the processor (or tokenizer, text-only) it was saved with."""

    model: Any
    processor: Any

    @property
    def multimodal(self) -> bool:
        return is_multimodal(self.processor)


def is_multimodal(processor: Any) -> bool:
    """Whether a processor takes images (a bare tokenizer does not)."""
    return hasattr(processor, "image_processor")


def check_model_dir(path: str, flag: str) -> None:
    """Fail at once on a local path with no model (a hub id like `org/name` is left to transformers)."""
    p = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or p.exists() or path.count("/") != 1
    if looks_local and not (p / "config.json").is_file():
        raise ConfigError(f"{flag} {path}: no model there (expected a directory with config.json, or a hub id "
                          "like org/name on a machine that can reach the hub)")


def load_model(path: str, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None,
               device_map: str | None = None, trust_remote_code: bool = False, flag: str = "--model",
               processor_kwargs: dict | None = None) -> LoadedModel:
    """Processor and model from a directory (or hub id); `flag` names the option in error messages. `dtype` may
    be "auto" (the checkpoint's own)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    check_model_dir(path, flag)
    try:
        processor = load_processor(path, trust_remote_code, processor_kwargs)
    except OSError as e:  # not a local directory, and the hub is unreachable or has no such model
        raise ConfigError(f"{flag} {path}: cannot load its processor/tokenizer ({str(e)[:300]})") from e
    cls = AutoModelForImageTextToText if is_multimodal(processor) else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: transformers cannot load it as {cls.__name__} ({e})") from e
    if device is not None and device_map is None:
        model.to(device)
    return LoadedModel(model, processor)
