"""Render a conversation exactly as a model sees it: token ids (image placeholders expanded), turn boundaries,
label positions and targets. The trainer renders the student's side with the same code.

The processor runs once per sample. Turn boundaries come from the chat template's renders of each prefix, as
text: a template whose prefixes are not text prefixes of the whole cannot be split into turns, and the sample is
rejected with that reason (`boundaries.Boundaries` carries them into tokens).
"""

from __future__ import annotations

import copy
import functools
import io
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genrecal_cache.core.config import Choice
from genrecal_cache.core.errors import RejectError
from genrecal_cache.core.models import is_multimodal

from .boundaries import Boundaries
from .rows import Sample


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) render turn `turn`; for an assistant turn the answer is [answer_start, end)."""

    turn: int
    role: str
    start: int
    end: int
    answer_start: int

    def to_dict(self) -> dict[str, Any]:
        return {"turn": self.turn, "role": self.role, "start": self.start, "end": self.end,
                "answer_start": self.answer_start}


@dataclass
class Rendered:
    """One rendered sample. Position p is a label position when token p+1 is an answer token."""

    input_ids: np.ndarray  # (L,) int64
    segments: list[Segment]
    inputs: dict[str, torch.Tensor]  # the processor's model inputs, batch dim 1
    text: str  # the chat template's text, before image expansion
    tokenizer_bos: bool = False  # the tokenizer put a BOS before `text` (a template that leaves BOS to it)

    @property
    def answer_spans(self) -> list[tuple[int, int]]:
        return [(s.answer_start, s.end) for s in self.segments if s.role == "assistant"]

    @property
    def label_mask(self) -> np.ndarray:  # (L,) bool
        mask = np.zeros(len(self.input_ids), dtype=bool)
        for start, end in self.answer_spans:
            mask[start - 1 : end - 1] = True
        return mask

    @property
    def label_positions(self) -> np.ndarray:  # (A,) int64
        return np.flatnonzero(self.label_mask)

    @property
    def targets(self) -> np.ndarray:  # (A,) int64, the token each label position predicts
        return self.input_ids[self.label_positions + 1]


class Truncated(Choice):
    """What happens to a generated answer cut off at max_new_tokens: rejected, or kept (and marked)."""

    reject = "reject"
    keep = "keep"


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher writes answers (`--answers generate`): greedy when temperature is 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    truncated: Truncated = Truncated.reject


@dataclass
class Generated:
    """A written answer: its token ids (without the token that ended it), each one's log-probability, and
    whether a stop token ended it (False: cut off at the token limit, mid-answer)."""

    token_ids: list[int]
    logprobs: list[float]
    stopped: bool = True

    @classmethod
    def cut(cls, ids: list[int], logprobs: list[float], stop: list[int], stopped: bool | None = None
            ) -> Generated:
        """Keep what comes before the first stop token (and nothing of the padding after it). `stopped`: what
        the engine says ended it (default: whether a stop token is there)."""
        n = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        return cls(ids[:n], logprobs[:n], n < len(ids) if stopped is None else stopped)


def _probe(image: bool = False, answer: bool = False) -> list[dict]:
    """The small conversation that probes a chat template: a user turn "x" (after one image, with `image`), then
    (with `answer`) the answer "y"."""
    msgs = [{"role": "user", "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": "x"}]}]
    if answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": "y"}]})
    return msgs


def prompt_turns(messages: list[dict]) -> list[dict]:
    """The turns before the conversation's last answer (all of them when it ends with a user turn)."""
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


class Renderer:
    """Renders samples for one processor; `max_length` rejects longer conversations."""

    def __init__(self, processor: Any, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.multimodal = is_multimodal(processor)
        self.max_length = max_length
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def render(self, sample: Sample) -> Rendered:
        if sample.images and not self.multimodal:
            raise RejectError(f"sample has {len(sample.images)} image(s) but the model is text-only")
        msgs = sample.messages
        if msgs[0]["role"] == "assistant":
            raise RejectError("conversation starts with an assistant turn: its first token has nothing to follow")
        images = [im.load() for im in sample.images]
        text = self.template_text(msgs, generation_prompt=False)
        inputs, expanded = self.encode_tapped(text, images)
        ids = inputs["input_ids"][0].numpy().astype(np.int64)
        if self.max_length is not None and len(ids) > self.max_length:
            raise RejectError(f"conversation has {len(ids)} tokens, more than --max-length {self.max_length}")
        # Each turn's boundaries: before its answer (with the generation prompt) and at its end (the last: len(ids)).
        wanted, seen_images = [], 0
        for turn, m in enumerate(msgs):
            if m["role"] == "assistant":
                wanted.append((msgs[:turn], seen_images, True, turn))
            seen_images += sum(p["type"] == "image" for p in m["content"])
            if turn < len(msgs) - 1:
                wanted.append((msgs[: turn + 1], seen_images, False, turn))
        found = iter(Boundaries(self, text, expanded, images, ids).tokens(wanted))
        segments, start = [], 0
        for turn, m in enumerate(msgs):
            answer_start = next(found) if m["role"] == "assistant" else start
            end = next(found) if turn < len(msgs) - 1 else len(ids)
            if m["role"] == "assistant" and end <= answer_start:
                raise RejectError(f"assistant turn {turn} renders to no tokens")
            segments.append(Segment(turn, m["role"], start, end, answer_start))
            start = end
        return Rendered(ids, segments, dict(inputs), text, bool(self.lead(text)))

    @functools.cached_property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: EOS, and the special tokens the chat template closes an answer with (named
        or extra special tokens, or added tokens marked special: Llama 3's <|eot_id|> when EOS is another)."""
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        try:
            r = self.render(Sample("probe", 0, _probe(answer=True)))
        except RejectError:
            return sorted(ids)
        start, end = r.answer_spans[-1]
        special = set(tok.all_special_ids) | {i for i, t in (getattr(tok, "added_tokens_decoder", {}) or {}).items()
                                             if getattr(t, "special", False)}
        ids |= {int(t) for t in r.input_ids[start:end] if int(t) in special}
        return sorted(ids)

    @functools.cached_property
    def image_token_ids(self) -> list[int]:
        """The tokens the processor writes for an image (placeholders, image start/end markers): the added tokens
        of a one-image prompt that its text-only twin lacks (text next to the image may tokenise otherwise, e.g.
        "x" for "▁x": no image token). A model should never write them in an answer."""
        if not self.multimodal:
            return []
        from PIL import Image

        from .rows import ImageRef

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
        try:
            plain = self.render_prompt(Sample("probe", 0, _probe())).input_ids
            image = self.render_prompt(Sample("probe", 0, _probe(image=True), [ImageRef(buf.getvalue())])).input_ids
        except RejectError:
            return []
        return sorted((set(image.tolist()) - set(plain.tolist())) & self.added_token_ids)

    def render_prompt(self, sample: Sample) -> Rendered:
        """What the model continues to write the conversation's last answer: every turn before it (all of them
        when the conversation ends with a user turn), then the generation prompt. No segments, no labels."""
        msgs = prompt_turns(sample.messages)
        if not msgs or msgs[-1]["role"] == "assistant":
            raise RejectError("nothing to answer: the conversation has no user turn before its last answer")
        n_images = sum(p["type"] == "image" for m in msgs for p in m["content"])
        text = self.template_text(msgs, generation_prompt=True)
        inputs = self.encode(text, [im.load() for im in sample.images[:n_images]])
        ids = inputs["input_ids"][0].numpy().astype(np.int64)
        if self.max_length is not None and len(ids) >= self.max_length:
            raise RejectError(f"prompt has {len(ids)} tokens, no room for an answer within --max-length "
                              f"{self.max_length}")
        return Rendered(ids, [], dict(inputs), text, bool(self.lead(text)))

    def template_text(self, msgs: list[dict], generation_prompt: bool) -> str:
        """The chat template's text of `msgs` (a template error rejects the sample)."""
        if not self.multimodal:  # text-only templates expect string content
            msgs = [{"role": m["role"], "content": "".join(p.get("text", "") for p in m["content"])} for m in msgs]
        try:
            return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises TemplateError and friends for conversations it refuses
            raise RejectError(f"chat template failed: {type(e).__name__}: {str(e)[:160]}") from None

    @functools.cached_property
    def bos_by_tokenizer(self) -> str | None:
        """The BOS a processor's tokenizer adds (and nothing else) in front of a text: transformers' processor
        `apply_chat_template` lets it add special tokens when the template's text does not start with BOS
        (llava-1.5's template leaves BOS to the tokenizer), and so does `encode`. None for text-only models (a
        tokenizer's `apply_chat_template` never adds any) and for tokenizers that add nothing, or more than a BOS."""
        tok = self.tokenizer
        if not self.multimodal or tok.bos_token is None:
            return None
        bare = list(tok("x", add_special_tokens=False)["input_ids"])
        return tok.bos_token if list(tok("x")["input_ids"]) == [tok.bos_token_id, *bare] else None

    def lead(self, text: str) -> int:
        """How many tokens the tokenizer puts before `text` (a BOS the template left to it): 0 or 1."""
        bos = self.bos_by_tokenizer
        return int(bos is not None and not text.startswith(bos))

    def encode(self, text: str, images: list, processor: Any = None) -> dict[str, torch.Tensor]:
        """The model inputs (batch dim 1) of `text` and its images, from the processor (or `processor`)."""
        try:
            if self.multimodal:
                return (processor or self.processor)(text=[text], images=[images] if images else None,
                                                     add_special_tokens=bool(self.lead(text)), return_tensors="pt")
            return self.tokenizer([text], add_special_tokens=False, return_tensors="pt")
        except Exception as e:  # processors raise ValueError (and worse) for inputs they cannot take
            raise RejectError(f"processor refused the sample: {type(e).__name__}: {str(e)[:200]}") from None

    def encode_tapped(self, text: str, images: list) -> tuple[dict[str, torch.Tensor], str | None]:
        """`encode`, and the text the tokenizer was given: `text` with every image placeholder expanded by the
        processor (None when the processor did not tokenise one string: then boundaries take processor calls)."""
        if not self.multimodal:
            return self.encode(text, images), text
        inputs = self.encode(text, images, self._tapped)
        seen = self._tapped.tokenizer.take()
        if isinstance(seen, (list, tuple)) and len(seen) == 1:
            seen = seen[0]
        return inputs, seen if isinstance(seen, str) else None

    @functools.cached_property
    def _tapped(self) -> Any:
        """A shallow copy of the processor whose tokenizer records the (expanded) text it is called with."""
        tapped = copy.copy(self.processor)
        tapped.tokenizer = _TextTap(self.tokenizer)
        return tapped

    @functools.cached_property
    def added_token_ids(self) -> frozenset[int]:
        """Tokens the tokenizer matches before anything else (special and other added tokens)."""
        return frozenset(getattr(self.tokenizer, "added_tokens_decoder", {}) or ())

    @functools.cached_property
    def image_marker(self) -> str | None:
        """What the chat template writes for one image (e.g. "<image>", Qwen2-VL's "<|vision_start|><|image_pad|>
        <|vision_end|>"): the text a one-image turn has beyond its text-only twin."""
        try:
            a, b = self.template_text(_probe(), False), self.template_text(_probe(image=True), False)
        except RejectError:
            return None
        head = len(os.path.commonprefix([a, b]))
        tail = len(os.path.commonprefix([a[head:][::-1], b[head:][::-1]]))
        return b[head : len(b) - tail] or None

    def collate(self, batch: list[Rendered]) -> dict[str, torch.Tensor]:
        """Right-pad token-axis inputs and concatenate the rest along dim 0, as processors batch them.

        Callers group samples with `compatible` first."""
        lmax = max(len(r.input_ids) for r in batch)
        out: dict[str, torch.Tensor] = {}
        for key in batch[0].inputs:
            values = [r.inputs[key] for r in batch]
            if _is_token_axis(values[0], len(batch[0].input_ids)):
                fill = self.pad_id if key == "input_ids" else 0
                padded = values[0].new_full((len(batch), lmax), fill)
                for i, v in enumerate(values):
                    padded[i, : v.shape[1]] = v[0]
                out[key] = padded
            else:
                out[key] = torch.cat(values, dim=0)
        return out

    @staticmethod
    def compatible(a: Rendered, b: Rendered) -> bool:
        """Whether two samples' non-token inputs concatenate (same keys, same trailing shapes)."""
        if a.inputs.keys() != b.inputs.keys():
            return False
        for key, va in a.inputs.items():
            vb = b.inputs[key]
            if _is_token_axis(va, len(a.input_ids)) and _is_token_axis(vb, len(b.input_ids)):
                continue
            if not isinstance(va, torch.Tensor) or va.shape[1:] != vb.shape[1:] or va.dtype != vb.dtype:
                return False
        return True


class _TextTap:
    """Stands in for a processor's tokenizer: forwards every call, and keeps the text each thread last gave it."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._seen: dict[int, Any] = {}

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._seen[threading.get_ident()] = text
        return self._tokenizer(text, *args, **kwargs)

    def take(self) -> Any:
        return self._seen.pop(threading.get_ident(), None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_tokenizer", "_seen"):
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


def compatible_runs(items: list[Rendered], max_tokens: int | None = None) -> list[list[int]]:
    """Indices of `items` in runs of consecutive samples that `collate` can batch together (and whose padded
    size stays within `max_tokens`, when given)."""
    runs: list[list[int]] = []
    for i, r in enumerate(items):
        if runs:
            run = runs[-1]
            longest = max(len(r.input_ids), *(len(items[j].input_ids) for j in run))
            fits = max_tokens is None or (len(run) + 1) * longest <= max_tokens
            if fits and Renderer.compatible(items[run[0]], r):
                run.append(i)
                continue
        runs.append([i])
    return runs


def _is_token_axis(value: Any, length: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, length)
