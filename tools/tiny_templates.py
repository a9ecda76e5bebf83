"""Chat templates written after published ones (Qwen2-VL, Llama-2, Mistral v0.1/v0.3, Gemma 3, Llama 3, LLaVA-1.5),
tiny tokenizers in the two styles real models use (byte-level BPE; '▁' pieces with byte fallback) and processors
that expand each template's image placeholder: for tests of turn boundaries and label masks.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    Gemma3ImageProcessor,
    Gemma3Processor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

KINDS = ("bytelevel", "metaspace")
BASE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0-3 in both styles, as in Llama
IMAGE_TOKENS = 4  # placeholder tokens per image: 28 px images in 14 px patches (LLaVA drops its CLS token)
_GEMMA3_IMAGE = ("<start_of_image>", "<image_soft_token>", "<end_of_image>")

# Content as text: a string, or parts where an image is the placeholder (`img`) and text is kept (trimmed: `trim`).
_TEXT_OF = ("{% macro text_of(content, img, trim=false) %}{% if content is string %}"
            "{{ content | trim if trim else content }}{% else %}{% for part in content %}"
            "{% if part['type'] == 'image' %}{{ img }}{% else %}{{ part['text'] | trim if trim else part['text'] }}"
            "{% endif %}{% endfor %}{% endif %}{% endmacro %}")
_ALTERNATE = ("{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{% endif %}")

# Qwen2-VL: a default system prompt when the conversation has none; ChatML turns end "<|im_end|>\n".
QWEN2VL = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2-chat: the system text folded into the first user turn as <<SYS>>, BOS written before every [INST],
# content stripped, answers " answer </s>", roles must alternate; no generation prompt.
LLAMA2 = _TEXT_OF + (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = text_of(messages[0]['content'], '<image>') %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}" + _ALTERNATE +
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + text_of(message['content'], '<image>') %}"
    "{% else %}{% set content = text_of(message['content'], '<image>') %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Mistral-7B-Instruct-v0.1: one BOS, "[INST] q [/INST]" as plain text, answers "answer</s> " whose space merges
# with the next "[INST]" into one token; the system text folded into the first user turn (as Mistral's later
# templates do; v0.1's own raises for a system role).
MISTRAL_V01 = _TEXT_OF + (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = text_of(messages[0]['content'], '<image>') + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}" + _ALTERNATE +
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system_message if loop.first else '') + text_of(message['content'], '<image>') + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ text_of(message['content'], '<image>') + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Mistral v0.3 (v3 tokenizer, [INST] a control token): the system text goes into the *last* user turn, so it is
# missing from a conversation that ends with an answer: such a conversation has no consistent prefixes.
MISTRAL_V03 = _TEXT_OF + (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = text_of(messages[0]['content'], '[IMG]') %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{% for message in loop_messages %}" + _ALTERNATE +
    "{% if message['role'] == 'user' %}{% if loop.last and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + text_of(message['content'], '[IMG]') + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + text_of(message['content'], '[IMG]') + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + text_of(message['content'], '[IMG]') | trim + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Gemma 3: no system role (its text opens the first user turn), every text part trimmed, "model" turns.
GEMMA3 = _TEXT_OF + (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = text_of(messages[0]['content'], '') + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}" + _ALTERNATE +
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
    " + (first_user_prefix if loop.first else '') }}"
    "{{ text_of(message['content'], '<start_of_image>', true) }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Llama 3.1/3.2-Vision: BOS in the template, a default system header (knowledge and today's date) always written,
# content trimmed, and the answer with its <|eot_id|> inside {% generation %} (for return_assistant_tokens_mask).
LLAMA3 = _TEXT_OF + (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = text_of(messages[0]['content'], '', true) %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: {{ date_string | default('26 Jul 2024') }}\n\n{{ system_message }}<|eot_id|>"
    "{% for message in loop_messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ text_of(message['content'], '<|image|>', true) }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ text_of(message['content'], '<|image|>', true) }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# llava-hf/llava-1.5: BOS left to the tokenizer, images before the text, answers "answer " in {% generation %}
# with no end-of-turn token at all, the generation prompt "ASSISTANT:" without its space. List content only.
LLAVA15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TemplateSpec:
    """A template and the tokens it needs. An assistant turn renders as the generation prompt, then
    `answer_prefix`, the answer (stripped when `trim`), then `turn_end` (which holds `eot`, if the template
    writes an end-of-turn token)."""

    name: str
    source: str
    image_token: str  # what the template writes for an image, which the processor expands
    bos: str | None
    eos: str
    specials: tuple[str, ...]  # added tokens besides BASE_SPECIALS (role markers, image tokens)
    image_tokens: tuple[str, ...]  # the special tokens one image becomes (markers and placeholders)
    eot: str | None  # the special token that ends an answer; None: the template writes none
    turn_end: str
    answer_prefix: str = ""
    trim: bool = False
    tokenizer_adds_bos: bool = True  # as Llama's, Mistral's, Gemma's; all templates but LLaVA-1.5's write it too
    alternation: bool = False  # raises for roles that do not alternate
    system_consistent: bool = True  # False: a system message makes prefixes inconsistent (a reject)
    strings: bool = True  # takes string content (text-only models)

    def assistant_text(self, answer: str) -> str:
        """What the template writes for an answer after the generation prompt."""
        return self.answer_prefix + (answer.strip() if self.trim else answer) + self.turn_end

    def expand(self, text: str) -> str:
        """`text` with each image placeholder as `processor_for`'s processor writes it for the tokenizer."""
        if self.name == "gemma3":
            boi, soft, eoi = _GEMMA3_IMAGE
            return text.replace(boi, f"\n\n{boi}{soft * IMAGE_TOKENS}{eoi}\n\n")
        return text.replace(self.image_token, self.image_token * IMAGE_TOKENS)


TEMPLATES: dict[str, TemplateSpec] = {t.name: t for t in (
    TemplateSpec("qwen2vl", QWEN2VL, "<|image_pad|>", None, "<|im_end|>",
                 ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>"), ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"), "<|im_end|>",
                 "<|im_end|>\n", tokenizer_adds_bos=False),
    TemplateSpec("llama2", LLAMA2, "<image>", "<s>", "</s>", ("<image>",), ("<image>",), "</s>", " </s>", " ",
                 trim=True, alternation=True),
    TemplateSpec("mistral_v01", MISTRAL_V01, "<image>", "<s>", "</s>", ("<image>",), ("<image>",), "</s>", "</s> ",
                 alternation=True),
    TemplateSpec("mistral_v03", MISTRAL_V03, "[IMG]", "<s>", "</s>", ("[INST]", "[/INST]", "[IMG]"), ("[IMG]",),
                 "</s>", "</s>", " ", trim=True, alternation=True, system_consistent=False),
    TemplateSpec("gemma3", GEMMA3, "<start_of_image>", "<bos>", "<eos>",
                 ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", *_GEMMA3_IMAGE), _GEMMA3_IMAGE,
                 "<end_of_turn>", "<end_of_turn>\n", trim=True, alternation=True),
    TemplateSpec("llama3", LLAMA3, "<|image|>", "<|begin_of_text|>", "<|eot_id|>",
                 ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|image|>"), ("<|image|>",), "<|eot_id|>", "<|eot_id|>", trim=True),
    TemplateSpec("llava15", LLAVA15, "<image>", "<s>", "</s>", ("<image>",), ("<image>",), None, " ", " ",
                 strings=False),
)}


def _corpus(seed: int, n: int = 1500) -> list[str]:
    """Sentences of the words the templates and the tests write, so merges are useful but not complete."""
    words = ("what which is the this that digit number image picture shown in a an of please answer with word "
             "tell me how many are there describe read see look at it here one two three four five six seven "
             "eight nine yes no sure system user assistant model You are helpful assistant. Be brief. "
             "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> Cutting Knowledge Date: December 2023 Today "
             "26 Jul 2024").split()
    rng = random.Random(seed)
    lines = [" ".join(chr(c) for c in range(33, 127)) + "\n\t"]
    for _ in range(n):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(["", "\n", "\n\n"]))
    return lines


def train_base(kind: str, vocab_size: int = 600, seed: int = 0) -> Tokenizer:
    """A BPE tokenizer with BASE_SPECIALS, 'bytelevel' (GPT-2/Qwen) or 'metaspace' (Llama/Mistral: '▁' pieces
    split at every word start, "▁" prepended to the text's first piece only, unknown characters as <0xXX> bytes)."""
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BASE_SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(seed), trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # as Qwen2's: offsets keep the leading space
        return tok
    if kind != "metaspace":
        raise ValueError(f"tokenizer kind {kind!r}: expected one of {KINDS}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BASE_SPECIALS))
    tok.train_from_iterator(_corpus(seed), trainer)
    # Rebuild the model with the 256 byte pieces SentencePiece's byte fallback needs.
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    out = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    out.add_special_tokens(list(BASE_SPECIALS))
    out.pre_tokenizer = tok.pre_tokenizer
    out.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return out


def tokenizer_for(base: Tokenizer, spec: TemplateSpec) -> PreTrainedTokenizerFast:
    """`base` with the template's special tokens and roles, and a post-processor that adds BOS, if it does."""
    tok = Tokenizer.from_str(base.to_str())
    tok.add_special_tokens(list(spec.specials))
    if spec.tokenizer_adds_bos:
        assert spec.bos is not None
        bos = processors.TemplateProcessing(single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
                                            special_tokens=[(spec.bos, tok.token_to_id(spec.bos))])
        tok.post_processor = bos if tok.post_processor is None else processors.Sequence([tok.post_processor, bos])
    pad = "<|endoftext|>" if "<|endoftext|>" in spec.specials else "<pad>"
    # Gemma 3's processor finds its image tokens by name on the tokenizer.
    named = dict(zip(("boi_token", "image_token", "eoi_token"), _GEMMA3_IMAGE)) if spec.name == "gemma3" else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, unk_token="<unk>",
                                   pad_token=pad, extra_special_tokens=named)
    fast.chat_template = spec.source
    return fast


def processor_for(tok: PreTrainedTokenizerFast, spec: TemplateSpec) -> LlavaProcessor | Gemma3Processor:
    """The processor that expands the template's image placeholder into IMAGE_TOKENS tokens (28 px images):
    Gemma 3's own for its template, else a LlavaProcessor with the zoo llava's CLIP image processor."""
    size = 28
    if spec.name == "gemma3":
        image_processor = Gemma3ImageProcessor(size={"height": size, "width": size}, do_pan_and_scan=False)
        return Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=spec.source,
                               image_seq_length=IMAGE_TOKENS)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=spec.image_token, chat_template=spec.source)
