"""Tiny models built offline from configs: three vision-language teachers/students and one text-only LM (the
default zoo), and more families for the family matrix (`FAMILY_NAMES`: Gemma 3, InternVL, Granite, mllama).

Each has its own locally trained tokenizer and chat template, head_dim 32 (vLLM's CPU attention needs >= 32),
and is saved so that transformers and vLLM both load it. Tests import `build_zoo`; run as a script to build one.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ZOO_NAMES = ("llava", "idefics3", "qwen2vl", "textlm")
# More families, built only for the family matrix (tests/cache/teacher/test_families.py): a softcapped Gemma 3 VLM, InternVL
# (-hf layout), a Granite text LM (logits_scaling) and mllama (Llama 3.2 Vision: images through cross-attention).
FAMILY_NAMES = ("gemma3", "internvl", "granite", "mllama")
_DIGITS = "zero one two three four five six seven eight nine".split()
_WORDS = (
    "what which is the this that digit number image picture shown in a an of please answer with word "
    "tell me how many are there describe read write see look at it here one more time yes no it's "
    "sure correct wrong the answer system you helpful assistant user question first second third "
    "USER: ASSISTANT: User: Assistant: model user\nassistant\nsystem\n"
).split(" ")

# Chat templates. Image parts render as each processor's placeholder; the processor expands it.
_LLAVA_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}\n"
    "{% elif m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% else %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}</s>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ ' ' + m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ ' ' + c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TURN_TEMPLATE = (
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# The family matrix's templates, each shaped like its family's published one (without tools and dates).
_GEMMA3_TEMPLATE = (  # google/gemma-3-*-it: the system prompt opens the first user turn; contents trimmed
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] %}"
    "{% set first_user_prefix = sys + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ first_user_prefix if loop.first else '' }}"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_INTERNVL_TEMPLATE = (  # OpenGVLab/InternVL3-*-hf: ChatML, an image as <IMG_CONTEXT> on its own line
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GRANITE_TEMPLATE = (  # ibm-granite/granite-3.*-instruct
    "{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}<|end_of_text|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)
_MLLAMA_TEMPLATE = (  # meta-llama/Llama-3.2-11B-Vision-Instruct: an image as <|image|> before the turn's text
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _corpus(seed: int, n: int = 3000) -> Iterator[str]:
    """Sentences like the demo's questions and answers, so tokenizers learn useful merges."""
    rng = random.Random(seed)
    vocab = _WORDS + _DIGITS
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randint(3, 14))]
        yield " ".join(words).capitalize() + rng.choice(["?", ".", "!", "", "\n"])


def _train_tokenizer(
    kind: str, vocab_size: int, specials: list[str], seed: int, **special_roles: str
) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer, 'bytelevel' (GPT-2/Qwen style), 'metaspace' (Llama/SentencePiece style) or
    'gemma' (metaspace with runs of newlines kept apart from words, as Gemma's vocabulary has them), with atomic
    special tokens. (transformers rebuilds a Qwen2 tokenizer as byte-level BPE whatever is saved.)"""
    if kind in ("metaspace", "gemma"):
        scheme = "never" if kind == "gemma" else "always"  # Gemma adds no space before the first word
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
        if kind == "gemma":
            newlines = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
            tok.pre_tokenizer = pre_tokenizers.Sequence([newlines, tok.pre_tokenizer])
        tok.decoder = decoders.Metaspace(prepend_scheme=scheme)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    # Printable ASCII in the corpus keeps every character encodable by the metaspace model.
    ascii_line = " ".join(chr(c) for c in range(33, 127)) + "\n\t"
    tok.train_from_iterator([ascii_line, *_corpus(seed)], trainer)
    extra = [s for s in specials if s not in special_roles.values()]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special_roles, extra_special_tokens=extra)
    fast.padding_side = "right"
    return fast


def _save_tokenizer(tok: PreTrainedTokenizerFast, template: str, out: Path) -> None:
    tok.chat_template = template
    tok.save_pretrained(out)


def _text_kwargs(tok: PreTrainedTokenizerFast, scale: int, **over: object) -> dict:
    """A decoder of width 64*scale and 2*scale layers with head_dim 32, its special ids taken from `tok`."""
    kw = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=64 * scale,
        intermediate_size=128 * scale,
        num_hidden_layers=2 * scale,
        num_attention_heads=2 * scale,
        num_key_value_heads=scale,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    kw.update(over)
    return kw


def _build_llava(out: Path, seed: int, scale: int) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _train_tokenizer(
        "metaspace", 600, ["<unk>", "<s>", "</s>", "<pad>", "<image>"], seed,
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    image_size, patch = 112, 14  # 8x8 = 64 image tokens (the CLS token is dropped)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32 * scale, intermediate_size=64 * scale, num_hidden_layers=2, num_attention_heads=scale,
            image_size=image_size, patch_size=patch, projection_dim=32 * scale,
        ),
        text_config=LlamaConfig(**_text_kwargs(tok, scale)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    _rename_llava_keys(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE,
    )
    processor.save_pretrained(out)
    _save_tokenizer(tok, _LLAVA_TEMPLATE, out)


def _rename_llava_keys(out: Path) -> None:
    """transformers 5.x saves the CLIP tower as `vision_tower.embeddings.*`; vLLM expects llava-hf's layout
    `vision_tower.vision_model.*`. transformers reloads either."""
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        renamed = {}
        for k, v in tensors.items():
            for prefix in ("vision_tower.", "model.vision_tower."):
                if k.startswith(prefix) and not k.startswith(prefix + "vision_model."):
                    k = prefix + "vision_model." + k[len(prefix):]
                    break
            renamed[k] = v
        save_file(renamed, f, metadata={"format": "pt"})


def _build_idefics3(out: Path, seed: int, scale: int) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    specials = ["<|end_of_text|>", "<|begin_of_text|>", "<pad>", "<image>", "<fake_token_around_image>",
                "<global-img>", "<end_of_utterance>"]
    specials += [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    tok = _train_tokenizer(
        "bytelevel", 700, specials, seed + 1,
        bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<pad>",
    )
    image_size, patch, shuffle = 64, 16, 2  # (64/16)^2 / 2^2 = 4 image tokens
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=32 * scale, intermediate_size=64 * scale, num_hidden_layers=2, num_attention_heads=scale,
            image_size=image_size, patch_size=patch,
        ),
        text_config=LlamaConfig(**_text_kwargs(tok, scale, rms_norm_eps=1e-5)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=shuffle,
        pad_token_id=tok.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    model.save_pretrained(out)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=(image_size // patch) ** 2 // shuffle**2,
        chat_template=_IDEFICS3_TEMPLATE,
    )
    processor.save_pretrained(out)
    _save_tokenizer(tok, _IDEFICS3_TEMPLATE, out)


def _build_qwen2vl(out: Path, seed: int, scale: int) -> None:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = _train_tokenizer("bytelevel", 800, specials, seed + 2, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    text = _text_kwargs(tok, scale, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [4, 6, 6]})
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=32 * scale, hidden_size=64 * scale, num_heads=scale, mlp_ratio=2,
                           patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(out)
    pixels = 56 * 56  # 4x4 patches of 14 px, merged 2x2: 4 image tokens per image
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(size=size), chat_template=_CHATML_TEMPLATE,
    )
    processor.save_pretrained(out)
    _save_tokenizer(tok, _CHATML_TEMPLATE, out)


def _build_textlm(out: Path, seed: int, scale: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _train_tokenizer(
        "bytelevel", 500, ["<unk>", "<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], seed + 3,
        unk_token="<unk>", bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>",
    )
    # Tied embeddings on purpose: the store must handle a head that is the input-embedding table.
    model = Qwen2ForCausalLM(Qwen2Config(**_text_kwargs(tok, scale, tie_word_embeddings=True)))
    model.save_pretrained(out)
    _save_tokenizer(tok, _TURN_TEMPLATE, out)


def _build_gemma3(out: Path, seed: int, scale: int) -> None:
    """Gemma 3 (SigLIP tower, 4 soft tokens per image) with a final logit softcap low enough to matter."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tok = _train_tokenizer(
        "gemma", 650, specials, seed + 4, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>",
    )
    tok.add_tokens(["\n\n", "\n\n\n", "\n\n\n\n"])  # single tokens in Gemma's vocabulary; vLLM looks them up
    image_size, patch, per_image = 64, 16, 4  # 4x4 patches pooled to 2x2 = 4 soft tokens
    text = _text_kwargs(tok, scale, query_pre_attn_scalar=32, sliding_window=512, final_logit_softcapping=3.0,
                        layer_types=["sliding_attention", "full_attention"] * scale)
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**text),
        vision_config=SiglipVisionConfig(
            hidden_size=32 * scale, intermediate_size=64 * scale, num_hidden_layers=2, num_attention_heads=scale,
            image_size=image_size, patch_size=patch, vision_use_head=False,
        ),
        mm_tokens_per_image=per_image,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
        tie_word_embeddings=True,  # as published: the head is the (unscaled) input embedding table
    )
    config.text_config.tie_word_embeddings = True
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tok, image_seq_length=per_image, chat_template=_GEMMA3_TEMPLATE,
    )
    processor.save_pretrained(out)
    _save_tokenizer(tok, _GEMMA3_TEMPLATE, out)


def _build_internvl(out: Path, seed: int, scale: int) -> None:
    """InternVL in transformers' own (-hf) layout: InternViT tower, pixel shuffle to 4 tokens, Qwen2 decoder."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = _train_tokenizer(
        "bytelevel", 750, specials, seed + 5, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
        video_token="<video>",
    )
    image_size, patch, per_image = 64, 16, 4  # 4x4 patches, pixel-shuffled by 0.5: 2x2 = 4 tokens
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32 * scale, intermediate_size=64 * scale, num_hidden_layers=2, num_attention_heads=scale,
            image_size=image_size, patch_size=patch,
        ),
        text_config=dict(model_type="qwen2", **_text_kwargs(tok, scale)),
        image_token_id=tok.context_image_token_id,
        image_seq_length=per_image,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    size = {"height": image_size, "width": image_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False, max_patches=1),
        tokenizer=tok, video_processor=InternVLVideoProcessor(size=size), image_seq_length=per_image,
        chat_template=_INTERNVL_TEMPLATE,
    )
    processor.save_pretrained(out)
    _save_tokenizer(tok, _INTERNVL_TEMPLATE, out)


def _build_granite(out: Path, seed: int, scale: int) -> None:
    """A Granite text LM: its logits are divided by `logits_scaling`, as IBM's Granite 3 models do."""
    from transformers import GraniteConfig, GraniteForCausalLM

    specials = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|pad|>"]
    tok = _train_tokenizer("bytelevel", 550, specials, seed + 6, bos_token="<|end_of_text|>",
                           eos_token="<|end_of_text|>", pad_token="<|pad|>")
    config = GraniteConfig(**_text_kwargs(tok, scale), logits_scaling=4.0, embedding_multiplier=2.0,
                           residual_multiplier=0.5, attention_multiplier=1 / 32)
    GraniteForCausalLM(config).save_pretrained(out)
    _save_tokenizer(tok, _GRANITE_TEMPLATE, out)


def _build_mllama(out: Path, seed: int, scale: int) -> None:
    """mllama (Llama 3.2 Vision): one <|image|> token per image; the image reaches the text only through
    cross-attention layers (here decoder layer 1 of 3)."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    tok = _train_tokenizer(
        "bytelevel", 600, specials, seed + 7, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", image_token="<|image|>",
    )
    image_size = 28  # one tile of 2x2 patches of 14 px
    text = {k: v for k, v in _text_kwargs(tok, scale).items() if k != "head_dim"}  # 64 / 2 heads = 32
    config = MllamaConfig(
        vision_config=MllamaVisionConfig(
            hidden_size=32 * scale, intermediate_size=64 * scale, num_hidden_layers=2, num_global_layers=1,
            attention_heads=scale, image_size=image_size, patch_size=14, max_num_tiles=1,
            supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0], vision_output_dim=64 * scale,
        ),
        text_config=MllamaTextConfig(**dict(text, num_hidden_layers=3 * scale),
                                     cross_attention_layers=list(range(1, 3 * scale, 3))),
        image_token_index=tok.image_token_id,
    )
    model = MllamaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": image_size, "width": image_size}, max_image_tiles=1),
        tokenizer=tok, chat_template=_MLLAMA_TEMPLATE,
    )
    processor.save_pretrained(out)
    _save_tokenizer(tok, _MLLAMA_TEMPLATE, out)


_BUILDERS: dict[str, Callable[[Path, int, int], None]] = {
    "llava": _build_llava,
    "idefics3": _build_idefics3,
    "qwen2vl": _build_qwen2vl,
    "textlm": _build_textlm,
    "gemma3": _build_gemma3,
    "internvl": _build_internvl,
    "granite": _build_granite,
    "mllama": _build_mllama,
}


def build_model(name: str, out: Path | str, seed: int = 0, scale: int = 1) -> Path:
    """Build one zoo model into `out` (random weights from `seed`) unless it is already there.

    `scale` multiplies width, layers and heads (head_dim stays 32): 1 for tests, larger for benchmarks."""
    out = Path(out)
    if (out / "genrecal_zoo.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _BUILDERS[name](out, seed, scale)
    (out / "genrecal_zoo.json").write_text(json.dumps({"name": name, "seed": seed, "scale": scale}))
    return out


def build_zoo(root: Path | str, seed: int = 0, names: tuple[str, ...] = ZOO_NAMES) -> dict[str, Path]:
    """Build every zoo model under `root`; returns name -> directory."""
    return {name: build_model(name, Path(root) / name, seed) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, epilog="e.g. python tools/tiny_zoo.py out/zoo --names "
                                     "llava idefics3  (writes out/zoo/llava and out/zoo/idefics3)")
    parser.add_argument("out", type=Path, help="directory to build the models into, one subdirectory per model "
                        "(a model already there is kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--names", nargs="*", default=list(ZOO_NAMES), choices=ZOO_NAMES + FAMILY_NAMES,
                        help=f"models to build (default: {' '.join(ZOO_NAMES)})")
    args = parser.parse_args()
    for name, path in build_zoo(args.out, args.seed, tuple(args.names)).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
