"""What a teacher backend is (`Teacher`: forward, generate, close), what its forward returns (`TeacherOutput`),
the identity every backend records in the store, and `load_teacher`, which picks the configured backend.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .chat import Generated, GenerationSettings, Rendered, Renderer
from .errors import RejectError
from .head import TeacherHead
from .models import check_model_dir

if TYPE_CHECKING:
    from .cache import CacheConfig


@dataclass
class TeacherOutput:
    """One sample's teacher-forced hidden states, fp32 on CPU."""

    features: torch.Tensor  # (A, D) final features (the LM-head input) at the label positions
    question: torch.Tensor | None = None  # (P, D) at every other position, when asked
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> (A, D): after decoder layer k


class Teacher(Protocol):
    """A teacher backend. `forward` and `generate` return one item per sample, in order; a sample the backend
    cannot take comes back as a `RejectError` value (its reason goes to the rejects table), never raised."""

    processor: Any
    config: Any
    head: TeacherHead
    embed: torch.Tensor  # (V, D) input embeddings
    tied: bool
    takes_images: bool  # whether forward/generate use the decoded images (else the rendered inputs carry them)

    def forward(self, renderer: Renderer, batch: list[Rendered], question: bool, images: list[list[Any]],
                layers: tuple[int, ...] = ()) -> list[TeacherOutput | RejectError]: ...

    def generate(self, renderer: Renderer, prompts: list[Rendered], images: list[list[Any]],
                 gen: GenerationSettings, seeds: list[int]) -> list[Generated | RejectError]: ...

    def close(self) -> None: ...

    def renderer(self, max_length: int | None) -> Renderer: ...

    def identity(self) -> dict[str, Any]: ...

    def head_tensors(self) -> dict[str, torch.Tensor]: ...


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _config_digest(config: Any) -> str:
    """Digest of the architecture-defining config, ignoring where and how it was loaded."""
    drop = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "architectures"}

    def clean(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if k not in drop}
        return d

    return _sha256(json.dumps(clean(config.to_dict()), sort_keys=True, default=str))


class TeacherBase:
    """What every backend shares: the identity recorded in the store, and the head tensors it stores.

    Subclasses set `path`, `processor`, `config`, `head`, `embed`, `tied` and `model_class`."""

    path: str
    processor: Any
    config: Any
    head: TeacherHead
    embed: torch.Tensor
    tied: bool
    model_class: str
    takes_images = False

    def renderer(self, max_length: int | None) -> Renderer:
        return Renderer(self.processor, max_length)

    def close(self) -> None:
        """Release what the backend holds (engine processes); nothing to do by default."""

    def identity(self) -> dict[str, Any]:
        """What identifies this teacher in a store's attributes."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
        template = getattr(self.processor, "chat_template", None) or tok.chat_template or ""
        w = self.head.weight
        return {
            "name_or_path": str(self.path),
            "revision": getattr(self.config, "_commit_hash", None),
            "architecture": (self.config.architectures or [self.model_class])[0],
            "model_type": self.config.model_type,
            "hidden_size": int(w.shape[1]),
            "vocab_size": int(w.shape[0]),
            "config_digest": _config_digest(self.config),
            "tokenizer_digest": _sha256(vocab),
            "chat_template_digest": _sha256(template if isinstance(template, str) else json.dumps(template)),
            "head_digest": _sha256(w.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()),
        }

    def head_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.head.weight}
        if not self.tied:
            tensors["embed"] = self.embed
        if self.head.bias is not None:
            tensors["bias"] = self.head.bias
        return tensors


# Vision-language classes whose own forward applies their text config's logit scale or softcap (transformers 5.x).
# The others return the bare head output whatever their text config says (Gemma3ForConditionalGeneration,
# PaliGemma, LLaVA-NeXT over a Granite decoder, Aya Vision), although vLLM applies it: the store follows
# transformers, so that head(features) is the logits the model itself computes (tests/test_families.py).
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
                      "(tests/test_families.py shows how)", stacklevel=2)
    return None, None


def resolve_dtype(dtype: str, device: str) -> str:
    """--dtype auto: bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def load_teacher(cfg: CacheConfig) -> Teacher:
    """The configured backend's teacher."""
    check_model_dir(cfg.teacher, "--teacher")
    if cfg.backend == "vllm":
        from .teacher_vllm import VLLMTeacher

        util = cfg.gpu_memory_utilization or (0.9 if cfg.device.startswith("cuda") else 0.25)
        return VLLMTeacher(cfg.teacher, cfg.dtype, cfg.trust_remote_code, cfg.layer_ids, cfg.processor_kwargs_map,
                           tensor_parallel_size=cfg.tensor_parallel_size,
                           pipeline_parallel_size=cfg.pipeline_parallel_size,
                           gpu_memory_utilization=util / 2 if cfg.generation else util,
                           enforce_eager=cfg.enforce_eager, beside=cfg.output,
                           max_model_len=cfg.max_model_len or _engine_len(cfg))
    from .teacher_hf import HFTeacher

    return HFTeacher(cfg.teacher, cfg.dtype, cfg.device, cfg.device_map, cfg.trust_remote_code,
                     cfg.processor_kwargs_map)


def _engine_len(cfg: CacheConfig) -> int | None:
    """--max-length, within what the model's positions allow (vLLM refuses a longer max_model_len)."""
    from transformers import AutoConfig

    trust_remote_code = cfg.trust_remote_code  # only ever the flag (tests/reliability/test_untrusted.py)
    text = AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=trust_remote_code).get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    return min(x for x in (cfg.max_length, limit) if x) if cfg.max_length or limit else None
