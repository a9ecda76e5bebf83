"""The transformers backend on a CUDA GPU (`pytest -m gpu`; skipped cleanly without one)."""

from __future__ import annotations

import pytest
import torch

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(zoo, manifest, out, device: str, dtype: str):
    run_cache(CacheConfig(teacher=str(zoo["qwen2vl"]), manifest=manifest, output=out, device=device, dtype=dtype,
                          question_features=True, progress=False, command=["test"]))
    return TeacherStore(out)


def test_cuda_fp32_store_equals_cpu_store(zoo, clean_manifest, tmp_path):
    cpu = _run(zoo, clean_manifest, tmp_path / "cpu", "cpu", "float32")
    gpu = _run(zoo, clean_manifest, tmp_path / "gpu", "cuda", "float32")
    assert len(cpu) == len(gpu) > 0
    for i in range(len(cpu)):
        a, b = cpu[i], gpu[i]
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.targets, b.targets)
        assert (a.features - b.features).abs().max() <= 1e-3  # TF32-free fp32 matmuls differ by reduction order
    assert verify(gpu).ok


def test_cuda_bf16_store_verifies_and_head_is_close_to_fp32(zoo, clean_manifest, tmp_path):
    ref = _run(zoo, clean_manifest, tmp_path / "fp32", "cpu", "float32")
    bf16 = _run(zoo, clean_manifest, tmp_path / "bf16", "cuda", "bfloat16")
    assert bf16.meta["feature_dtype"] == "bfloat16"
    rep = verify(bf16)
    assert rep.ok, rep.failures[:3]
    h_ref, h_bf = ref.teacher_head(), bf16.teacher_head()
    for i in range(len(ref)):
        p_ref = torch.softmax(h_ref.logits(ref[i].features), -1)
        p_bf = torch.softmax(h_bf.logits(bf16[i].features), -1)
        assert torch.isfinite(p_bf).all() and (p_ref - p_bf).abs().max() < 2e-2
