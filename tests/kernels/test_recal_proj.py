"""recal_proj: ProjPre on stored features and ProjPost + LayerNorm, every path against float64 references."""

from __future__ import annotations

import pytest
import torch

from genrecal_cache.store.dtypes import to_storage
from genrecal_kernels.fused_linear_ce_kl import HAS_TRITON
from genrecal_kernels.recal_proj import proj_post_ln, proj_pre

from .utils import TOLERANCES, assert_close

IMPLS = ["chunked", "naive"] + (["triton"] if HAS_TRITON else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _stored(x: torch.Tensor, storage: str) -> torch.Tensor:
    """Features as the store reader hands them out: bf16 as uint16 bits, else as they are."""
    return torch.from_numpy(to_storage(x, storage)).to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("storage", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_proj_pre_reads_stored_features(impl, storage, dtype):
    g = torch.Generator().manual_seed(0)
    n, d_l, d_s = 37, 96, 40
    feats = torch.randn(n, d_l, generator=g)
    x = _stored(feats, storage)
    exact = x.view(torch.bfloat16).double() if x.dtype == torch.uint16 else x.double()  # what was stored
    w = (torch.randn(d_s, d_l, generator=g) / d_l**0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(d_s, generator=g).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(n, d_s, generator=g).to(DEVICE)
    y = proj_pre(x, w, b, impl=impl)
    (y.float() * dy).sum().backward()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = exact @ w64.T + b64
    (y64 * dy.double()).sum().backward()
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == dtype
    assert_close(y, y64, atol, rtol, f"{impl} y")
    assert_close(w.grad, w64.grad, atol * 10, rtol, f"{impl} dW")
    assert_close(b.grad, b64.grad, atol * 10, rtol, f"{impl} db")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_proj_post_layernorm_forward_and_every_gradient(impl, dtype, bias):
    g = torch.Generator().manual_seed(1)
    n, d_s, d_l = 37, 40, 96
    h = torch.randn(n, d_s, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(d_l, d_s, generator=g) / d_s**0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(d_l, generator=g).to(DEVICE, dtype).requires_grad_() if bias else None
    gamma = (1 + 0.1 * torch.randn(d_l, generator=g)).to(DEVICE, dtype).requires_grad_()
    beta = (0.1 * torch.randn(d_l, generator=g)).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(n, d_l, generator=g).to(DEVICE)
    y = proj_post_ln(h, w, b, gamma, beta, eps=1e-5, impl=impl)
    (y.float() * dy).sum().backward()
    leaves = [t for t in (h, w, b, gamma, beta) if t is not None]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    h64, w64 = ref[0], ref[1]
    b64 = ref[2] if bias else None
    g64, be64 = ref[-2], ref[-1]
    y64 = torch.nn.functional.layer_norm(h64 @ w64.T + (b64 if bias else 0.0), (d_l,), g64, be64, 1e-5)
    (y64 * dy.double()).sum().backward()
    atol, rtol = TOLERANCES[dtype]
    assert_close(y, y64, atol * 5, rtol, f"{impl} y")
    for name, t, r in zip(["dh", "dW", "db", "dgamma", "dbeta"] if bias else ["dh", "dW", "dgamma", "dbeta"],
                          leaves, ref):
        assert_close(t.grad, r.grad, atol * 20, rtol * 3, f"{impl} {name}")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "naive"])
def test_row_chunks_give_the_same_result(impl, monkeypatch):
    import genrecal_kernels.recal_proj as rp

    g = torch.Generator().manual_seed(2)
    h = torch.randn(37, 40, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(96, 40, generator=g).to(DEVICE).requires_grad_()
    gamma, beta = torch.ones(96, device=DEVICE), torch.zeros(96, device=DEVICE)
    outs = []
    for rows in (4096, 5):
        monkeypatch.setattr(rp, "_CHUNK_ROWS", rows)
        h.grad = w.grad = None
        y = proj_post_ln(h, w, None, gamma, beta, impl=impl)
        y.pow(2).sum().backward()
        outs.append((y.detach(), h.grad.clone(), w.grad.clone()))
    for a, b, name in zip(outs[0], outs[1], ["y", "dh", "dW"]):
        assert_close(a, b, 1e-5, 1e-5, name)


def test_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="ProjPre expects 8"):
        proj_pre(torch.zeros(2, 4), torch.zeros(3, 8))
