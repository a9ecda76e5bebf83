"""What a teacher backend is (`Teacher`: forward, generate, close), what its forward returns (`TeacherOutput`),
and the identity every backend records in the store; `load.py` picks the configured backend.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from genrecal_cache.core.config import Choice
from genrecal_cache.core.digests import digest_files
from genrecal_cache.core.errors import ConfigError, RejectError
from genrecal_cache.core.models import is_multimodal
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


# Where a checkpoint keeps its weights; with any safetensors file only those (transformers prefers them).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def model_folder(path: str, revision: str | None = None) -> Path:
    """The folder `--teacher` names: a local directory, or a hub id's snapshot in the local Hugging Face cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception as e:  # not cached (LocalEntryNotFoundError), or not a hub id
        raise ConfigError(f"--teacher {path}: cannot find its weight files to record their digests "
                          f"({type(e).__name__}); pass the checkpoint's local directory") from None


def weight_files(folder: Path, rehash: bool = False) -> list[dict[str, Any]]:
    """Every weight file of a checkpoint (top level, as transformers and vLLM read them): name, bytes and sha256,
    each digest computed once per version of the file and kept (`core/digests.py`; `rehash`: computed again)."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    files = [f for f in files if f.suffix == ".safetensors"] or files
    if not files:
        raise ConfigError(f"--teacher {folder}: no weight file ({', '.join(WEIGHT_SUFFIXES)}) in it")
    digests = digest_files(files, "weight file(s) of the teacher", rehash)
    return [{"name": f.name, "bytes": f.stat().st_size, "sha256": d} for f, d in zip(files, digests)]


def processor_digest(processor: Any) -> str | None:
    """Digest of the processor's configuration (image processor and processor settings, `--processor-kwargs`
    applied; the tokenizer and template have their own digests), without paths; None for a bare tokenizer."""
    if not is_multimodal(processor):
        return None
    drop = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "chat_template", "tokenizer"}

    def clean(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if k not in drop}
        return d

    config = processor.to_dict() if hasattr(processor, "to_dict") else {}
    config.setdefault("image_processor", processor.image_processor.to_dict())
    return _sha256(json.dumps(clean(config), sort_keys=True, default=str))


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

    def identity(self, rehash: bool = False) -> dict[str, Any]:
        """What identifies this teacher in a store's attributes (`rehash`: its weight files digested again)."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
        template = getattr(self.processor, "chat_template", None) or tok.chat_template or ""
        w = self.head.weight
        files = weight_files(model_folder(str(self.path), getattr(self.config, "_commit_hash", None)), rehash)
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
            # The whole body: one changed layer is another teacher (the head and config may be the same).
            "weights_digest": _sha256(json.dumps([[f["name"], f["sha256"]] for f in files])),
            "weight_files": files,
            "processor_digest": processor_digest(self.processor),
        }

    def head_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.head.weight}
        if not self.tied:
            tensors["embed"] = self.embed
        if self.head.bias is not None:
            tensors["bias"] = self.head.bias
        return tensors
