"""The one way this project loads a model and its processor: the processor decides the class (images: an
image-text-to-text model; text only: a causal LM), so the teacher backend, the trainer, evaluation and the plots
agree; and the logit function (scale, softcap) each applies to its LM head's output.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def load_processor(path: str | Path, trust_remote_code: bool = False, processor_kwargs: dict | None = None) -> Any:
    """The model's processor (vision-language) or tokenizer (text-only), as transformers loads it;
    `processor_kwargs` (e.g. Qwen2-VL's max_pixels, Idefics3's do_image_splitting) override its settings."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                             **(processor_kwargs or {}))
    except (OSError, ValueError, KeyError, TypeError):
        if processor_kwargs:
            raise ConfigError(f"--processor-kwargs {json.dumps(processor_kwargs)}: {path} has no processor that "
                              "takes them (only a tokenizer); drop the flag") from None
        proc = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tok = getattr(proc, "tokenizer", proc)
    if getattr(tok, "chat_template", None) is None and getattr(proc, "chat_template", None) is None:
        raise ConfigError(f"{path} has no chat template; add one to its tokenizer_config.json or chat_template.jinja")
    return proc


# Vision-language classes whose own forward applies their text config's logit scale or softcap (transformers 5.x).
# The others return the bare head output whatever their text config says (Gemma3ForConditionalGeneration,
# PaliGemma, LLaVA-NeXT over a Granite decoder, Aya Vision), although vLLM applies it: the store follows
# transformers, so that head(features) is the logits the model itself computes (tests/cache/teacher/test_families.py).
_COMPOSITES_THAT_SCALE = ("Gemma3nForConditionalGeneration", "Gemma4ForConditionalGeneration",
                          "Gemma4UnifiedForConditionalGeneration", "Granite4VisionForConditionalGeneration")
_COMPOSITES_THAT_DO_NOT = ("Gemma3ForConditionalGeneration", "PaliGemmaForConditionalGeneration",
                           "LlavaNextForConditionalGeneration", "AyaVisionForConditionalGeneration")


def head_scaling(config: Any) -> tuple[float | None, float | None]:
    """(logit scale, softcap) the model applies to its LM head's output, from its (text) config: Cohere's
    `logit_scale` multiplies, Granite's `logits_scaling` divides, Gemma's `final_logit_softcapping` caps.
    A vision-language model applies them only when its class does (`_COMPOSITES_THAT_SCALE`); a class in neither
    list whose text config sets them is warned about."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    if scale is None and getattr(text, "logits_scaling", None):
        scale = 1.0 / text.logits_scaling
    softcap = getattr(text, "final_logit_softcapping", None)
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if text is config or arch in _COMPOSITES_THAT_SCALE:
        return scale, softcap
    if (scale is not None or softcap is not None) and arch not in _COMPOSITES_THAT_DO_NOT:
        warnings.warn(f"{arch}: its text config sets a logit scale {scale} / softcap {softcap}, and GenRecal does not "
                      "know whether this class applies them; it assumes not (as transformers' Gemma 3 and PaliGemma "
                      "do not). Check head(stored features) against the model's own logits before training "
                      "(tests/cache/teacher/test_families.py shows how)", stacklevel=2)
    return None, None


def resolve_dtype(dtype: str, device: str) -> str:
    """--dtype auto: bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype
