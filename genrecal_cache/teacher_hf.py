"""The transformers teacher backend: a batched, teacher-forced forward that returns the final features
(the LM-head input, after the final norm) at the positions the store keeps. Runs on CPU or GPU.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .chat import Generated, GenerationSettings, Rendered, Renderer, load_processor
from .errors import ConfigError
from .head import TeacherHead


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


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


class TeacherIdentity:
    """What every backend shares: the identity recorded in the store, and the head tensors it stores.

    Subclasses set `path`, `processor`, `config`, `head` (TeacherHead), `embed` (V, D), `tied` and
    `model_class`."""

    path: str
    processor: Any
    config: Any
    head: TeacherHead
    embed: torch.Tensor
    tied: bool
    model_class: str

    def renderer(self, max_length: int | None) -> Renderer:
        return Renderer(self.processor, max_length)

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


class HFTeacher(TeacherIdentity):
    """A transformers teacher. `device_map="auto"` spreads a teacher larger than one GPU over all of them."""

    def __init__(self, path: str, dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
                 trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        self.path = path
        try:
            self.processor = load_processor(path, trust_remote_code)
        except OSError as e:  # not a local directory, and the hub is unreachable or has no such model
            raise ConfigError(f"--teacher {path}: cannot load its processor/tokenizer ({str(e)[:300]})") from e
        self.multimodal = hasattr(self.processor, "image_processor")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        cls = AutoModelForImageTextToText if self.multimodal else AutoModelForCausalLM
        try:
            self.model = cls.from_pretrained(path, dtype=getattr(torch, dtype), device_map=device_map,
                                             trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--teacher {path}: transformers cannot load it as {cls.__name__} ({e})") from e
        if device_map is None:
            self.model.to(device)
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.dtype = dtype
        out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        text_config = config.get_text_config()
        self.head = TeacherHead(
            weight=out.weight.detach(),
            bias=out.bias.detach() if getattr(out, "bias", None) is not None else None,
            logit_scale=getattr(text_config, "logit_scale", None),
            softcap=getattr(text_config, "final_logit_softcapping", None),
        )
        self.embed = inp.weight.detach()
        self.tied = out.weight.data_ptr() == inp.weight.data_ptr()
        self.config = config
        self.model_class = type(self.model).__name__

    @torch.no_grad()
    def forward(self, renderer: Renderer, batch: list[Rendered], question: bool,
                images: list[list[Any]] | None = None, layers: tuple[int, ...] = ()) -> list[dict[str, Any]]:
        """Per sample: `features` (A, D) at the label positions, `question` (P, D) at every other position when
        asked, and `layers` {k: (A, D)}: the residual stream after decoder layer k (`hidden_states[k]`) at the
        label positions. (`images` is for backends that take raw images; here they are in `batch`.)"""
        inputs = {k: v.to(self.device) for k, v in renderer.collate(batch).items()}
        out = self.model.base_model(**inputs, use_cache=False, output_hidden_states=bool(layers))
        hidden = out.last_hidden_state  # (B, L, D)
        outs = []
        for i, r in enumerate(batch):
            mask = torch.from_numpy(r.label_mask).to(hidden.device)  # (L_i,)
            h = hidden[i, : len(mask)]  # (L_i, D)
            item: dict[str, Any] = {"features": h[mask].float().cpu()}
            if question:
                item["question"] = h[~mask].float().cpu()
            if layers:
                item["layers"] = {k: out.hidden_states[k][i, : len(mask)][mask].float().cpu() for k in layers}
            outs.append(item)
        return outs

    @torch.no_grad()
    def generate(self, renderer: Renderer, prompts: list[Rendered], images: list[list[Any]],
                 gen: GenerationSettings, seeds: list[int]) -> list[Generated]:
        """The teacher's answer to each prompt (one at a time: this backend is the portable one, not the fast
        one), with the log-probability of every chosen token under the model's raw logits."""
        stop = renderer.stop_ids
        outs = []
        for r, seed in zip(prompts, seeds):
            torch.manual_seed(seed)  # per sample: a resumed job writes the same answers
            inputs = {k: v.to(self.device) for k, v in r.inputs.items()}
            g = self.model.generate(
                **inputs, max_new_tokens=gen.max_new_tokens, do_sample=gen.temperature > 0,
                temperature=gen.temperature if gen.temperature > 0 else None, top_p=gen.top_p if gen.temperature > 0
                else None, top_k=None, eos_token_id=stop, pad_token_id=renderer.pad_id, output_logits=True,
                return_dict_in_generate=True)
            new = g.sequences[0, len(r.input_ids):].cpu()  # (n,)
            logprobs = torch.stack(g.logits, 1)[0].float().log_softmax(-1).cpu()  # (n, V)
            chosen = logprobs.gather(-1, new[:, None])[:, 0]
            outs.append(Generated.cut(new.tolist(), chosen.tolist(), stop))
        return outs


def check_teacher_path(teacher: str) -> None:
    """Fail at once on a local path that does not exist (a hub id like `org/name` is left to transformers)."""
    p = Path(teacher).expanduser()
    looks_local = teacher.startswith((".", "/", "~")) or p.exists() or teacher.count("/") != 1
    if looks_local and not (p / "config.json").is_file():
        raise ConfigError(f"--teacher {teacher}: no model there (expected a directory with config.json, "
                          "or a hub id like org/name on a machine that can reach the hub)")

