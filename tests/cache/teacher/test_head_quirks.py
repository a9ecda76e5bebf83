"""Heads with quirks: head(stored features) reproduces the teacher's own logits for a Granite-style head
(`logits_scaling` divides), a softcapped Gemma-2 head and a Phi head with a bias; the vLLM backend reads the
bias from the checkpoint as transformers does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _teacher(zoo, tmp_path: Path, family: str) -> Path:
    """A tiny text teacher of `family` with the zoo text LM's tokenizer and chat template."""

    src = zoo["textlm"]
    base = transformers.AutoConfig.from_pretrained(src)
    kw = dict(vocab_size=base.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
              bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
              tie_word_embeddings=False)
    if family == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**kw, logits_scaling=4.0))
    elif family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**kw, head_dim=32,
                                                                         final_logit_softcapping=3.0))
    else:
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**kw))
        assert model.lm_head.bias is not None
        torch.nn.init.normal_(model.lm_head.bias, std=2.0)  # a bias that matters
    out = tmp_path / family
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.mark.parametrize("family", ["granite", "gemma2", "phi"])
def test_head_of_features_is_the_teachers_own_logits(family, zoo, text_manifest, tmp_path):

    path = _teacher(zoo, tmp_path, family)
    run_cache(CacheConfig(teacher=str(path), manifest=text_manifest, output=tmp_path / "s", dtype="float32",
                          device="cpu", progress=False, command=["t"]))
    store = TeacherStore(tmp_path / "s")
    assert len(store) == 3
    head = store.teacher_head()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i in range(len(store)):
        t = store[i]
        with torch.no_grad():
            logits = model(input_ids=t.token_ids[None]).logits[0]  # (L, V): what the teacher itself computes
        ours = head.logits(t.features)
        theirs = logits[t.label_positions]
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), family


def test_the_vllm_backend_reads_the_head_bias(zoo, tmp_path):

    from genrecal_cache.teacher.vllm import head_tensors_of

    path = _teacher(zoo, tmp_path, "phi")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weight, bias, embed, tied = head_tensors_of(path, model.config)
    assert not tied and torch.equal(weight, model.lm_head.weight) and torch.equal(bias, model.lm_head.bias)
    assert torch.equal(embed, model.get_input_embeddings().weight)


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_the_students_own_loss_uses_its_own_logits(family, zoo, text_manifest, tmp_path):
    """L_s and the ULD baseline's loss on a student with a scaled (Granite) or softcapped (Gemma-2) head use the
    logits the student itself computes, as the trainer's forward passes them."""
    import json

    from genrecal_cache.core.models import head_scaling, load_model
    from genrecal_cache.data.render import Renderer
    from genrecal_cache.data.rows import Row, parse_row
    from genrecal_train.losses import student_loss, uld_student_loss

    loaded = load_model(str(_teacher(zoo, tmp_path, family)))
    model = loaded.model.eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50.0)  # logits well past the softcap, as trained models have
    r = Renderer(loaded.processor).render(parse_row(Row(1, json.loads(text_manifest.read_text().splitlines()[1])),
                                                    text_manifest.parent))
    ids = torch.from_numpy(r.input_ids)[None]
    mask = torch.from_numpy(r.label_mask)[None]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        ours = student_loss(model.get_output_embeddings(), hidden, ids, mask, int(mask.sum()),
                            *head_scaling(model.config))
        theirs = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[mask], ids.roll(-1, 1)[mask])
        plain = student_loss(model.get_output_embeddings(), hidden, ids, mask, int(mask.sum()))
    assert abs(ours.item() - theirs.item()) <= 1e-5 * max(1.0, theirs.item())
    assert abs(plain.item() - theirs.item()) > 1e-3, "the quirk does not change the loss: the test cannot tell"

    top = torch.randn(int(mask.sum()), 5).log_softmax(-1)  # (n, K): a stand-in teacher's stored top-k
    with torch.no_grad():
        uld = uld_student_loss(hidden[mask], model.get_output_embeddings(), None, 1.0, teacher_topk_logprobs=top,
                               logit_scale=head_scaling(model.config)[0], softcap=head_scaling(model.config)[1])
        p = model(input_ids=ids).logits[mask].softmax(-1).sort(-1, descending=True).values  # (n, V_s)
        q = torch.nn.functional.pad(top.exp().sort(-1, descending=True).values, (0, p.shape[1] - 5))
    want = (p - q).abs().sum()
    assert abs(uld.item() - want.item()) <= 1e-4 * want.item()


def test_a_vlm_class_of_unknown_habit_with_a_scaled_text_config_is_warned_about():
    """transformers' composite classes differ in whether they apply their text config's softcap; one GenRecal has
    not checked gets a warning (and the bare head, like Gemma 3), the checked ones none."""
    import warnings

    from genrecal_cache.core.models import head_scaling

    config = transformers.Gemma3Config(text_config={"final_logit_softcapping": 30.0})
    config.architectures = ["Gemma3ForConditionalGeneration"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert head_scaling(config) == (None, None)
    config.architectures = ["SomeNewVLForConditionalGeneration"]
    with pytest.warns(UserWarning, match="SomeNewVLForConditionalGeneration.*softcap 30.0"):
        assert head_scaling(config) == (None, None)
    config.architectures = ["Gemma4ForConditionalGeneration"]  # a class that applies it
    assert head_scaling(config) == (None, 30.0)
