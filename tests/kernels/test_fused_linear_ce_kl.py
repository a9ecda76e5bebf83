"""fused_linear_ce_kl: every path against its own float64 reference, loss and gradient (Liger-Kernel style).

The Triton path runs under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import importlib

import pytest
import torch

from genrecal_kernels import fused_linear_ce_kl
from genrecal_kernels.fused_linear_ce_kl import _CHUNK_ELEMENTS, HAS_TRITON, _chunk_rows

from .utils import TOLERANCES, assert_close

IMPLS = ["chunked", "naive"] + (["triton"] if HAS_TRITON else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(r, z, w, t, bias=None, scale=None, softcap=None, T=1.0, w_ce=1.0, w_kl=1.0, ignore=-100,
              normalizer=None):
    """The loss in float64 with autograd: what every path must reproduce."""
    r = r.detach().double().requires_grad_()

    def act(x):
        x = x.double() @ w.double().T + (bias.double() if bias is not None else 0.0)
        x = x * (scale if scale is not None else 1.0)
        return softcap * torch.tanh(x / softcap) if softcap is not None else x

    a, az = act(r), act(z)
    mask = (t != ignore).double()
    n = normalizer if normalizer is not None else max(1.0, mask.sum().item())
    ce = torch.nn.functional.cross_entropy(a, t.clamp(min=0), reduction="none")
    log_q, log_p = torch.log_softmax(a / T, -1), torch.log_softmax(az / T, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    loss = ((w_ce * ce + w_kl * T * T * kl) * mask).sum() / n
    loss.backward()
    return loss.detach(), r.grad


def make(n=37, v=1001, d=96, dtype=torch.float32, seed=0, logit_size=1.0, ignored=(3,)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g) * (logit_size / d**0.5)
    r = torch.randn(n, d, generator=g)
    z = r + 0.5 * torch.randn(n, d, generator=g)  # a teacher close to, not equal to, the student
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignored)] = -100
    to = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    return to(r), to(z), to(w), t.to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extras", [{}, {"bias": True, "scale": 0.7, "softcap": 4.0}], ids=["plain", "bias-scale-cap"])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_loss_and_gradient_match_float64(impl, dtype, extras, T):
    r, z, w, t = make(dtype=dtype, logit_size=4.0)
    bias = torch.randn(w.shape[0], device=DEVICE).to(dtype) if extras.get("bias") else None
    kw = dict(bias=bias, logit_scale=extras.get("scale"), softcap=extras.get("softcap"), temperature=T,
              ce_weight=0.7, kl_weight=1.3)
    ref_loss, ref_grad = reference(r.float(), z.float(), w.float(), t, None if bias is None else bias.float(),
                                   extras.get("scale"), extras.get("softcap"), T, 0.7, 1.3)
    x = r.clone().requires_grad_()
    out = fused_linear_ce_kl(x, z, w, t, impl=impl, chunk_size=16, **kw)
    out.loss.backward()
    atol, rtol = TOLERANCES[dtype]
    assert_close(out.loss, ref_loss, atol, rtol, f"{impl} loss")
    assert_close(out.ce + out.kl, ref_loss, atol, rtol, f"{impl} ce + kl")
    assert x.grad.dtype == dtype
    assert_close(x.grad, ref_grad, atol, rtol * 3, f"{impl} grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_all_targets_ignored_gives_zero_and_no_nan(impl):
    r, z, w, t = make(n=9)
    t[:] = -100
    x = r.clone().requires_grad_()
    out = fused_linear_ce_kl(x, z, w, t, impl=impl)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_output_and_normalizer_scale_the_gradient(impl):
    r, z, w, t = make()
    ref_loss, ref_grad = reference(r, z, w, t, T=1.5, normalizer=100.0)
    x = r.clone().requires_grad_()
    out = fused_linear_ce_kl(x, z, w, t, temperature=1.5, normalizer=100, impl=impl)
    (out.loss * -3.5).backward()
    assert_close(out.loss, ref_loss, 1e-5, 1e-4, "loss")
    assert_close(x.grad, -3.5 * ref_grad, 1e-5, 3e-4, "grad")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "naive"])
def test_chunked_equals_unchunked(impl):
    r, z, w, t = make()
    grads = []
    for chunk in (None, 7, 1):
        x = r.clone().requires_grad_()
        out = fused_linear_ce_kl(x, z, w, t, impl=impl, chunk_size=chunk)
        out.loss.backward()
        grads.append((out.loss, x.grad))
    for loss, grad in grads[1:]:
        assert_close(loss, grads[0][0], 1e-6, 1e-5, "loss")
        assert_close(grad, grads[0][1], 1e-7, 1e-5, "grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits_stay_finite(impl):
    r, z, w, t = make(n=8, logit_size=1e4)
    ref_loss, ref_grad = reference(r, z, w, t, T=2.0)
    x = r.clone().requires_grad_()
    out = fused_linear_ce_kl(x, z, w, t, temperature=2.0, impl=impl)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    assert_close(out.loss, ref_loss, 1e-2, 1e-4, "loss")
    assert_close(x.grad, ref_grad, 1e-1, 1e-3, "grad")


def test_teacher_side_gets_no_gradient():
    r, z, w, t = make(n=5)
    z.requires_grad_()
    w.requires_grad_()
    x = r.clone().requires_grad_()
    fused_linear_ce_kl(x, z, w, t, impl="chunked").loss.backward()
    assert z.grad is None and w.grad is None and x.grad is not None


def test_bad_arguments_say_what_is_wrong():
    r, z, w, t = make(n=5)
    with pytest.raises(ValueError, match="shapes disagree"):
        fused_linear_ce_kl(r, z[:4], w, t)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_linear_ce_kl(r, z, w, t, temperature=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_linear_ce_kl(r, z, w, t, impl="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_on_gpu_at_a_realistic_size(dtype):
    r, z, w, t = make(n=1024, v=32000, d=1024, dtype=dtype, logit_size=8.0, ignored=range(0, 1024, 7))
    ref_loss, ref_grad = reference(r.float(), z.float(), w.float(), t, T=2.0, softcap=30.0)
    x = r.clone().requires_grad_()
    out = fused_linear_ce_kl(x, z, w, t, temperature=2.0, softcap=30.0, impl="triton")
    out.loss.backward()
    atol, rtol = TOLERANCES[dtype]
    assert_close(out.loss, ref_loss, atol, rtol, "loss")
    assert_close(x.grad, ref_grad, atol, rtol * 3, "grad")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "naive"])
def test_minus_infinity_logits_masked_vocabulary_stay_finite(impl):
    """A -inf bias masks part of the vocabulary on both sides: p = q = 0 there must add nothing to the KL."""
    r, z, w, t = make(n=9, ignored=())
    bias = torch.zeros(w.shape[0], device=DEVICE)
    bias[500:] = float("-inf")
    t = t % 500
    x = r.clone().requires_grad_()
    out = fused_linear_ce_kl(x, z, w, t, bias=bias, impl=impl)
    out.loss.backward()
    ref_loss, ref_grad = reference(r, z, w[:500], t, bias=bias[:500])
    assert_close(out.loss, ref_loss, 1e-5, 1e-4, "loss")
    assert_close(x.grad, ref_grad, 1e-5, 3e-4, "grad")


def test_targets_out_of_range_are_refused():
    r, z, w, t = make(n=5, ignored=())
    t[0] = w.shape[0]
    with pytest.raises(ValueError, match="targets must be in"):
        fused_linear_ce_kl(r, z, w, t)


def test_cpu_chunks_stay_a_few_hundred_rows_at_large_n_times_v():
    """Off CUDA a large N * V never runs as one chunk (its logits would be O(N V) memory): a chunk is a few hundred
    rows whatever N, a small problem is one chunk, and CUDA keeps its large memory-bounded chunks."""
    for v in (32000, 152064):
        rows = _chunk_rows(1 << 20, v, "cpu")
        assert 128 <= rows <= 512
        assert _chunk_rows(1024, v, torch.device("cpu")) == rows
    assert _chunk_rows(37, 1001, "cpu") == 37
    assert _chunk_rows(1 << 20, 32000, "cuda") == _CHUNK_ELEMENTS // 32000


def test_chunk_size_overrides_the_chosen_rows(monkeypatch):
    """Without chunk_size, `_chunk_rows` sets the rows per chunk (its budget shrunk here to 10 rows); chunk_size=
    overrides it; the loss and gradient match the reference either way."""
    module = importlib.import_module("genrecal_kernels.fused_linear_ce_kl")
    rows_torch, seen = module._rows_torch, []

    def spy(xr, *args):
        seen.append(xr.shape[0])
        return rows_torch(xr, *args)

    monkeypatch.setattr(module, "_rows_torch", spy)
    monkeypatch.setattr(module, "_CPU_MIN_ROWS", 1)
    monkeypatch.setattr(module, "_CPU_CHUNK_BYTES", 10 * 1001 * 4)
    r, z, w, t = (x.cpu() for x in make())  # N = 37, V = 1001
    ref_loss, ref_grad = reference(r, z, w, t)
    for chunk_size, rows in ((None, [10, 10, 10, 7]), (16, [16, 16, 5])):
        seen.clear()
        x = r.clone().requires_grad_()
        out = fused_linear_ce_kl(x, z, w, t, impl="chunked", chunk_size=chunk_size)
        out.loss.backward()
        assert seen == rows
        assert_close(out.loss, ref_loss, 1e-5, 1e-4, f"loss, chunk_size={chunk_size}")
        assert_close(x.grad, ref_grad, 1e-5, 3e-4, f"grad, chunk_size={chunk_size}")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "naive"])
def test_masked_vocabulary_with_temperature_and_scale(impl):
    """The -inf masked vocabulary at T != 1 and a logit scale: the KL's p = 0 terms still add nothing."""
    r, z, w, t = make(n=9, ignored=(2,))
    bias = torch.zeros(w.shape[0], device=DEVICE)
    bias[700:] = float("-inf")
    t = t % 700
    t[2] = -100
    x = r.clone().requires_grad_()
    out = fused_linear_ce_kl(x, z, w, t, bias=bias, logit_scale=1.7, temperature=2.0, impl=impl)
    out.loss.backward()
    ref_loss, ref_grad = reference(r, z, w[:700], t, bias=bias[:700], scale=1.7, T=2.0)
    assert_close(out.loss, ref_loss, 1e-5, 1e-4, "loss")
    assert_close(x.grad, ref_grad, 1e-5, 3e-4, "grad")
