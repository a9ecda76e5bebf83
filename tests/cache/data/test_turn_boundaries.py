"""Turn boundaries from one processor call per sample: equal to encoding every prefix with its images, and
placed by character offsets for templates whose prefixes are text- but not token-consistent (Mistral's `</s> `)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from genrecal_cache.core.errors import RejectError
from genrecal_cache.core.models import load_processor
from genrecal_cache.data.boundaries import place_stretches
from genrecal_cache.data.render import Renderer
from genrecal_cache.data.rows import ImageRef, Sample


def _png(w: int, h: int, color: str) -> ImageRef:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return ImageRef(buf.getvalue())


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


def _conversations(n: int, seed: int = 0) -> list[Sample]:
    """Multi-turn conversations with 0-2 images per user turn, of several sizes, text around and between them."""
    rng, out = random.Random(seed), []
    for k in range(n):
        msgs, images = [], []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": [_text("Be brief.")]})
        for _ in range(rng.randint(1, 4)):
            content = []
            for _ in range(rng.choice([0, 0, 1, 2])):
                content.append({"type": "image"})
                images.append(_png(rng.choice([32, 300, 640]), rng.choice([32, 480]), rng.choice(["red", "blue"])))
                if rng.random() < 0.5:
                    content.append(_text(rng.choice(["\n", " ", "x"])))
            content.append(_text(rng.choice(["what is this?", "one", " two ", "\n"])))
            msgs.append({"role": "user", "content": content})
            msgs.append({"role": "assistant", "content": [_text(rng.choice(["six", " seven", "a b c", "ok\n"]))]})
        out.append(Sample(f"s{k}", k, msgs, images))
    return out


def _reference_segments(proc, sample: Sample) -> list[tuple[int, int, int]]:
    """(start, answer_start, end) per turn the way it is defined: encode each prefix with its images, whose
    tokens must be a prefix of the whole conversation's."""
    def encode(msgs, n_images, gen):
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        images = [im.load() for im in sample.images[:n_images]]
        out = proc(text=[text], images=[images] if images else None, add_special_tokens=False)
        return list(out["input_ids"][0])

    msgs, n_images = sample.messages, len(sample.images)
    full = encode(msgs, n_images, False)
    segs, start, seen = [], 0, 0
    for turn, m in enumerate(msgs):
        answer = start
        if m["role"] == "assistant":
            prefix = encode(msgs[:turn], seen, True)
            assert full[: len(prefix)] == prefix
            answer = len(prefix)
        seen += sum(p["type"] == "image" for p in m["content"])
        if turn == len(msgs) - 1:
            end = len(full)
        else:
            prefix = encode(msgs[: turn + 1], seen, False)
            assert full[: len(prefix)] == prefix
            end = len(prefix)
        segs.append((start, answer, end))
        start = end
    return segs


class _Counting:
    """An image processor, counting its calls (the renderer's cost is one call per sample)."""

    def __init__(self, proc):
        self.proc, self.calls = proc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.proc(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("proc", "calls"):
            raise AttributeError(name)
        return getattr(self.proc, name)


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2vl"])
def test_one_processor_call_gives_the_per_prefix_boundaries(name, zoo):
    proc = load_processor(zoo[name])
    renderer = Renderer(load_processor(zoo[name]))
    counting = renderer.processor.image_processor = _Counting(renderer.processor.image_processor)
    for sample in _conversations(12):
        calls = counting.calls
        r = renderer.render(sample)
        assert counting.calls == calls + bool(sample.images), "the images were processed more than once"
        assert [(s.start, s.answer_start, s.end) for s in r.segments] == _reference_segments(proc, sample)


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_without_a_known_image_marker_each_prefix_is_expanded_by_the_processor(name, zoo):
    """The fallback when the expansion cannot be placed from text: still the reference boundaries."""
    proc = load_processor(zoo[name])
    renderer = Renderer(proc)
    renderer.__dict__["image_marker"] = None  # as for a template whose image text could not be found
    for sample in _conversations(6, seed=1):
        r = renderer.render(sample)
        assert [(s.start, s.answer_start, s.end) for s in r.segments] == _reference_segments(proc, sample)


def test_stretches_are_placed_only_where_the_expansion_leaves_one_choice():
    # "M" expands to "EE" and "FF": each stretch has one place.
    assert place_stretches("aMbMc", "aEEbFFc", "M", 2) == [(0, 1, 0), (2, 1, 3), (4, 1, 6)]
    # The first expansion contains the middle stretch's text: "x" could sit at 2 or 3.
    assert place_stretches("aMxMc", "aExxEc", "M", 2) == [(0, 1, 0), (2, 1, None), (4, 1, 5)]
    assert place_stretches("aMb", "aEEc", "M", 1) is None  # not a replacement of the marker
    assert place_stretches("aMbMc", "aEbc", "M", 2) is None  # an image with no expansion
    assert place_stretches("ab", "ab", None, 0) == [(0, 2, 0)]


# Mistral-7B-Instruct-v0.1's template: each answer ends with "</s> ", and the next user turn starts "[INST]".
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token + ' ' }}{% endif %}"
           "{% endfor %}")


@pytest.fixture(scope="module")
def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style (metaspace) BPE that writes " [INST]" as one token, as Mistral's does."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    lines = [" ".join(chr(c) for c in range(33, 127))] + ["[INST] one two three four five [/INST]"] * 50
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = MISTRAL
    return fast


def test_text_consistent_template_is_split_by_character_offsets(mistral_tokenizer):
    tok = mistral_tokenizer
    msgs = [{"role": "user", "content": [_text("one")]}, {"role": "assistant", "content": [_text("two")]},
            {"role": "user", "content": [_text("three")]}, {"role": "assistant", "content": [_text("four five")]}]
    plain = [{"role": m["role"], "content": m["content"][0]["text"]} for m in msgs]
    prefix = tok.apply_chat_template(plain[:2], tokenize=False)
    full = tok.apply_chat_template(plain, tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert full.startswith(prefix)
    # The premise: the lone space after "</s>" is its own token in the prefix, part of "▁[INST]" in the whole.
    assert ids[: len(tok(prefix, add_special_tokens=False)["input_ids"])] != tok(prefix, add_special_tokens=False)["input_ids"]

    r = Renderer(tok).render(Sample("m", 0, msgs))
    tokens = tok.convert_ids_to_tokens(r.input_ids.tolist())
    first, second = (r.input_ids[a:b].tolist() for a, b in r.answer_spans)
    assert tok.decode(first) == "two</s>" and tok.decode(second) == "four five</s> "
    # The token straddling the end of the first answer ("▁[INST]": the space, then the next turn) goes to the
    # user turn after it, so the student is never trained to write the next turn's text.
    user = r.segments[2]
    assert tokens[user.start].startswith("▁[") and r.segments[1].end == user.start
    assert all(s.end == t.start for s, t in zip(r.segments, r.segments[1:]))
    assert np.array_equal(r.targets, r.input_ids[r.label_positions + 1])


def test_text_inconsistent_template_is_still_rejected(mistral_tokenizer):
    tok = mistral_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %}.{% else %}\n{% endif %}{% endfor %}")  # the last turn ends otherwise
    msgs = [{"role": "user", "content": [_text("one")]}, {"role": "assistant", "content": [_text("two")]},
            {"role": "user", "content": [_text("three")]}, {"role": "assistant", "content": [_text("four")]}]
    with pytest.raises(RejectError, match="text up to the end of turn 0 is not a prefix"):
        Renderer(tok).render(Sample("m", 0, msgs))
