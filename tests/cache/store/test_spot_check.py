"""`inspect-cache --spot-check N --teacher PATH`: a store checked against its own teacher passes (bf16 and fp8,
generated answers included); against another checkpoint, chat template or processor setting it fails, naming the
array and the samples. (A vLLM store checked with transformers: tests/cache/teacher/test_vllm.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from tests.helpers import perturbed_copy, run_command

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stores(zoo, clean_manifest, tmp_path_factory) -> dict[str, Path]:
    """The clean demo rows cached by the tiny LLaVA (float32 compute): bf16 features with the teacher's own answers
    (greedy), and fp8 features of the dataset's answers; question features and layer 1 in both."""
    root = tmp_path_factory.mktemp("spot")
    out = {}
    for name, options in (("bf16", {"feature_dtype": "bf16", "answers": "generate", "max_new_tokens": 4,
                                    "truncated": "keep"}), ("fp8", {"feature_dtype": "fp8"})):
        out[name] = root / name  # written in this process: the stores are data here, the spot-check is the CLI's
        res = run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=clean_manifest, output=out[name],
                                    question_features=True, layers="1", dtype="float32", device="cpu",
                                    progress=False, render_workers=0, command=["test"], **options))
        assert res.samples > 0, res.top_reasons(5)
    return out


def _spot(store: Path, teacher: Path, *flags: str):
    return run_command("inspect-cache", "--store", store, "--spot-check", "4", "--teacher", teacher, *flags, env=ENV,
                       timeout=600)


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_a_store_checked_with_its_own_teacher_passes(stores, zoo, kind):
    done = _spot(stores[kind], zoo["llava"], "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert r["ok"] and r["seed"] == 0 and len(r["sample_ids"]) == 4
    assert {"token_ids", "features", "question_features", "layers/1", "topk_logprobs", "distribution"} <= set(
        r["checks"])
    assert ("answer" in r["checks"]) == (kind == "bf16")
    assert r["kl_mean"] < 1e-6  # the same teacher: the stored rounding is all that differs
    if kind == "bf16":
        text = _spot(stores[kind], zoo["llava"], "--seed", "3").stdout
        assert text.startswith("spot-check: OK  4 samples drawn with --seed 3: ")


def test_another_checkpoint_fails_naming_the_features_and_the_samples(stores, zoo, tmp_path):
    other = perturbed_copy(zoo["llava"], tmp_path / "llava-b")
    for kind in ("bf16", "fp8"):
        done = _spot(stores[kind], other, "--json")
        assert done.returncode == 1, done.stderr[-3000:]
        r = json.loads(done.stdout)
        feats = r["checks"]["features"]
        assert not r["ok"] and not feats["ok"] and set(feats["failed"]) <= set(r["sample_ids"]) and feats["failed"]
        assert r["checks"]["token_ids"]["ok"]  # the same tokenizer and template: only the numbers differ
        assert feats["note"] == "the teacher computes other values now"


def test_another_chat_template_fails_on_the_token_ids(stores, zoo, tmp_path):
    other = tmp_path / "llava-template"
    shutil.copytree(zoo["llava"], other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("USER: ", "HUMAN: "))
    done = _spot(stores["fp8"], other)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "token_ids" in done.stdout and "another chat template, tokenizer or processor setting" in done.stdout


def test_another_processor_setting_fails(stores, zoo, tmp_path):
    other = tmp_path / "llava-processor"
    shutil.copytree(zoo["llava"], other)
    config = json.loads((other / "processor_config.json").read_text())
    config["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    (other / "processor_config.json").write_text(json.dumps(config))
    done = _spot(stores["bf16"], other, "--json")
    assert done.returncode == 1, done.stderr[-3000:]
    assert not json.loads(done.stdout)["checks"]["features"]["ok"]


def test_spot_check_needs_a_teacher(stores):
    done = run_command("inspect-cache", "--store", stores["bf16"], "--spot-check", "2", env=ENV, timeout=300)
    assert done.returncode == 2 and "--spot-check needs --teacher PATH" in done.stderr, done.stderr[-2000:]
