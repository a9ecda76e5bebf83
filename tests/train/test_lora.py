"""`--lora-rank`: the student trains through PEFT adapters (the projector in full, the vision encoder and the rest
frozen), each stage saves a merged student that transformers loads and the adapter PEFT loads to the same logits,
and a LoRA run resumes exactly from its adapter checkpoint."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genrecal_cache.core.config import to_argv
from genrecal_cache.core.errors import ConfigError
from genrecal_train.lora import LoraSpec, target_names
from genrecal_train.models import vision_parameter_names
from genrecal_train.trainer import train
from tests.helpers import run_command

from .test_trainer import _cfg, _losses, _store


@pytest.fixture(scope="module")
def store(zoo, demo_manifest, tmp_path_factory) -> Path:
    return _store(zoo, demo_manifest, tmp_path_factory.mktemp("lora") / "store", question_features=False)


@pytest.fixture(scope="module")
def lora_run(store, zoo, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`train-student --method sft --lora-rank 4 --save-adapter` as users run it."""
    out = tmp_path_factory.mktemp("lora-run")
    done = run_command("train-student", "--store", store, "--student", zoo["idefics3"], "--output", out, "--method",
                       "sft", "--lora-rank", "4", "--save-adapter", "--max-steps", "3", "--batch-size", "4", "--lr",
                       "5e-2", "--lr-end", "5e-2", "--reliance-every", "0", "--device", "cpu", "--no-progress",
                       "--report-to", "none", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_only_adapters_and_the_projector_train(lora_run):
    out, done = lora_run
    line = next(x for x in done.stdout.splitlines() if x.startswith("train-student stage 3:"))
    assert "LoRA adapters" in line and "language model 0 trained" in line and "vision encoder 0 trained" in line
    assert "projector 0 trained" not in line
    logged = [r for r in map(json.loads, (out / "stage3" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == [3]  # --log-every 10 > 3 steps: the last step is still logged


def test_the_merged_student_loads_and_matches_base_plus_adapter(lora_run, zoo):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, _ = lora_run
    final, base_dir = out / "stage3" / "final", Path(zoo["idefics3"])
    merged, base = load_file(final / "student" / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert merged.keys() == base.keys()  # a plain transformers checkpoint: no adapter or wrapper names
    model = AutoModelForImageTextToText.from_pretrained(final / "student", dtype=torch.float32).eval()
    vision = vision_parameter_names(model)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed, "training changed nothing"
    assert not changed & vision and not any("embed_tokens" in k for k in changed)
    assert any("connector" in k for k in changed) and any("q_proj" in k for k in changed)

    with_adapter = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32), final / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-5 * a.abs().max()

    proc = AutoProcessor.from_pretrained(final / "student")
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                    add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert 1 <= gen.shape[1] - inputs["input_ids"].shape[1] <= 3


def test_lora_resumes_exactly_and_refuses_other_options(store, zoo, tmp_path):
    kw = dict(method="sft", lora_rank=4, lr=5e-2, lr_end=5e-2, save_every=2, heldout_fraction=0.0,
              report_to="none")
    train(_cfg(store, zoo, tmp_path / "straight", max_steps=4, **kw))
    train(_cfg(store, zoo, tmp_path / "resumed", max_steps=2, **kw))
    train(_cfg(store, zoo, tmp_path / "resumed", max_steps=4, resume=True, **kw))
    a, b = _losses(tmp_path / "straight", 3), _losses(tmp_path / "resumed", 3)
    assert len(a) == len(b) == 4 and a == b, (a, b)
    assert json.loads((tmp_path / "resumed" / "stage3" / "checkpoint" / "adapter" / "adapter_config.json"
                       ).read_text())["r"] == 4
    with pytest.raises(ConfigError, match="trained with LoRA adapters"):
        train(_cfg(store, zoo, tmp_path / "resumed", max_steps=6, resume=True, method="sft", report_to="none"))
    with pytest.raises(ConfigError, match=r"the --lora-\* options it was started with"):
        train(_cfg(store, zoo, tmp_path / "resumed", max_steps=6, resume=True, **{**kw, "lora_alpha": 3.0}))


def test_targets_and_bad_options_are_named(zoo, store, tmp_path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(zoo["qwen2vl"], dtype=torch.float32)
    names = target_names(model, LoraSpec(4, 8.0, None))
    assert names and not any(".visual." in f".{n}." for n in names)  # vision encoder and merger: never adapters
    assert "lm_head" not in names
    assert all(n.endswith("q_proj") for n in target_names(model, LoraSpec(4, 8.0, ("q_proj",))))
    with pytest.raises(ConfigError, match="no linear layer"):
        target_names(model, LoraSpec(4, 8.0, ("nope",)))
    with pytest.raises(ConfigError, match="is named q_prj"):  # one typo among good names is not ignored
        target_names(model, LoraSpec(4, 8.0, ("q_proj", "q_prj")))
    with pytest.raises(ConfigError, match="needs --lora-rank"):
        _cfg(store, zoo, tmp_path, save_adapter=True)
    assert _cfg(store, zoo, tmp_path, lora_rank=4).lora_alpha == 8.0
    assert "--lora-alpha" not in to_argv(_cfg(store, zoo, tmp_path), changed_only=True)  # unset without LoRA
    bad = run_command("train-student", "--store", store, "--student", zoo["idefics3"], "--output", tmp_path / "o",
                      "--method", "sft", "--lora-rank", "4", "--lora-targets", "q_prj", "--device", "cpu",
                      "--no-progress", timeout=300)
    assert bad.returncode == 2 and "--lora-targets q_prj" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["genrecal", "uld"])
def test_lora_stages_run_on_a_gpu_with_bf16_frozen_weights(method, store, zoo, tmp_path):
    from transformers import AutoModelForImageTextToText

    train(_cfg(store, zoo, tmp_path, method=method, device="cuda", max_steps=3, epochs=1, lora_rank=4,
               report_to="none"))
    for stage in (2, 3):
        losses = _losses(tmp_path, stage)
        assert losses and all(x == x and x < 1e4 for x in losses), losses  # finite, no NaN
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "stage3" / "final" / "student")
    assert all(torch.isfinite(p).all() for p in model.parameters())
