"""TeacherHead: logits and top-k from features, against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from genrecal_cache.store.head import TeacherHead


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-3)])
@pytest.mark.parametrize("extras", [{}, {"bias": True, "logit_scale": 0.5, "softcap": 30.0}])
def test_logits_and_topk_match_float64_reference(dtype, atol, extras):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1001, 96, generator=g).to(dtype)
    z = torch.randn(37, 96, generator=g)
    b = torch.randn(1001, generator=g) if extras.get("bias") else None
    head = TeacherHead(w, b, extras.get("logit_scale"), extras.get("softcap"), vocab_chunk=100)
    ref = z.double() @ w.double().T
    if b is not None:
        ref = ref + b.double()
    if extras.get("logit_scale"):
        ref = ref * extras["logit_scale"]
    if extras.get("softcap"):
        ref = extras["softcap"] * torch.tanh(ref / extras["softcap"])
    got = head.logits(z)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got.double() - ref).abs().max() <= atol * ref.abs().max()
    ids, lps = head.topk(z, 5, chunk=10)
    ref_lp = torch.log_softmax(ref, -1)
    assert torch.equal(ids, ref_lp.topk(5).indices)
    assert torch.allclose(lps.double(), ref_lp.topk(5).values, atol=1e-3)


def test_topk_of_nothing_is_empty():
    ids, lps = TeacherHead(torch.randn(10, 4)).topk(torch.zeros(0, 4), 3)
    assert ids.shape == (0, 3) and lps.shape == (0, 3)
