"""What a teacher backend is (`Teacher`: forward, generate, close), what its forward returns (`TeacherOutput`),
and the identity every backend records in the store; `load.py` picks the configured backend.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from genrecal_cache.core.config import Choice
from genrecal_cache.core.errors import RejectError
from genrecal_cache.data.render import Generated, GenerationSettings, Rendered, Renderer
from genrecal_cache.store.head import TeacherHead


class Backend(Choice):
    """Which engine runs the teacher."""

    hf = "hf"
    vllm = "vllm"


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
