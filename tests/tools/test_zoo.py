"""The tiny model zoo: deterministic, offline, head_dim >= 32, different tokenizers, loadable without loss."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors import safe_open
from tiny_zoo import build_model
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from genrecal_cache.core.models import load_processor
from tests.helpers import VLMS


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", [*VLMS, "textlm"])
def test_reloads_without_missing_or_unexpected_keys(name, zoo):
    cls = AutoModelForImageTextToText if name in VLMS else AutoModelForCausalLM
    _, info = cls.from_pretrained(zoo[name], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    cfg = json.loads((zoo[name] / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert text["head_dim"] >= 32  # vLLM's CPU attention needs it


def test_llava_uses_the_llava_hf_key_layout_vllm_expects(zoo):
    with safe_open(zoo["llava"] / "model.safetensors", "pt") as f:
        vision = [k for k in f.keys() if "vision_tower" in k]
    assert vision and all(".vision_tower.vision_model." in f".{k}" for k in vision), vision[:3]


def test_same_seed_same_weights_other_seed_other_weights(zoo, tmp_path):
    again = build_model("idefics3", tmp_path / "a", seed=0)
    other = build_model("idefics3", tmp_path / "b", seed=1)
    assert _digest(again) == _digest(zoo["idefics3"]) != _digest(other)


def test_tokenizers_differ_between_models(zoo):
    text = "What digit is this? seven"
    ids = {}
    for name, path in zoo.items():
        proc = load_processor(path)
        tok = getattr(proc, "tokenizer", proc)
        ids[name] = tuple(tok(text, add_special_tokens=False)["input_ids"])
    assert len(set(ids.values())) == len(ids), ids
