"""uld_loss (Universal Logit Distillation) against a float64 autograd reference: the sorted-probability L1 with
zero padding, loss and the gradients of the student's hidden states, head weight and bias; full teacher
distribution or its top-k; either vocabulary the larger; chunked equals one chunk; grad_output != 1."""

from __future__ import annotations

import pytest
import torch

from genrecal_kernels import uld_loss

from .utils import TOLERANCES, assert_close


def reference(h, w, b, q_sorted, normalizer, scale=1.0, softcap=None):
    """ULD in float64 with autograd: the student's logit function, softmax, sort both decreasing, pad the
    shorter with zeros, L1, sum / n."""
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b = b.detach().double().requires_grad_() if b is not None else None
    logits = (h @ w.T + (b if b is not None else 0.0)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    p = logits.softmax(-1).sort(-1, descending=True).values
    q = q_sorted.double()
    width = max(p.shape[1], q.shape[1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[1]))
    loss = (p - q).abs().sum() / normalizer
    loss.backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def make(n, v_s, v_t, d_s=48, d_t=40, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d_s, generator=g)
    w = torch.randn(v_s, d_s, generator=g) * (2.0 / d_s**0.5)  # peaked enough that sorting matters
    b = torch.randn(v_s, generator=g) * 0.1 if bias else None
    z = torch.randn(n, d_t, generator=g)
    wt = torch.randn(v_t, d_t, generator=g) * (2.0 / d_t**0.5)
    to = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return to(h), to(w), to(b), to(z), to(wt)


@pytest.mark.parametrize("v_s,v_t", [(301, 517), (517, 301), (300, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 7])
def test_full_distribution_matches_the_reference(v_s, v_t, dtype, chunk):
    h, w, b, z, wt = make(29, v_s, v_t, dtype=dtype)
    atol, rtol = TOLERANCES[dtype]
    q = (z.double() @ wt.double().T).softmax(-1).sort(-1, descending=True).values
    ref = reference(h, w, b, q, normalizer=11.0)
    hh, ww, bb = (x.detach().clone().requires_grad_() for x in (h, w, b))
    loss = uld_loss(hh, ww, bias=bb, teacher_z=z, teacher_weight=wt, normalizer=11.0, chunk_size=chunk)
    (2.5 * loss).backward()  # grad_output != 1
    assert_close(loss, ref[0], atol, rtol, "loss")
    for name, got, want in (("h", hh.grad, ref[1]), ("w", ww.grad, ref[2]), ("b", bb.grad, ref[3])):
        assert_close(got, 2.5 * want, atol, rtol, f"grad {name}")


@pytest.mark.parametrize("scale,softcap", [(0.25, None), (1.0, 2.0), (3.0, 1.5)])
def test_the_students_own_logit_scale_and_softcap(scale, softcap):
    """A Granite-like (logits divided) or Gemma-like (softcapped) student: its distribution is the one it
    computes itself, and the gradients go through the scale and the tanh."""
    h, w, b, z, wt = make(17, 211, 300)
    q = (z.double() @ wt.double().T).softmax(-1).sort(-1, descending=True).values
    ref = reference(h, w, b, q, normalizer=17.0, scale=scale, softcap=softcap)
    plain = reference(h, w, b, q, normalizer=17.0)
    assert (ref[0] - plain[0]).abs() > 1e-3  # the student's logit function matters here
    hh, ww, bb = (x.detach().clone().requires_grad_() for x in (h, w, b))
    loss = uld_loss(hh, ww, bias=bb, logit_scale=scale, softcap=softcap, teacher_z=z, teacher_weight=wt,
                    chunk_size=5)
    loss.backward()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(loss, ref[0], atol, rtol, "loss")
    for name, got, want in (("h", hh.grad, ref[1]), ("w", ww.grad, ref[2]), ("b", bb.grad, ref[3])):
        assert_close(got, want, atol, rtol, f"grad {name}")


def test_a_frozen_student_head_gets_no_gradient_and_h_the_same():
    """Under LoRA the student's head is frozen: no V_s x D_s gradient is computed, h's gradient is unchanged."""
    h, w, b, z, wt = make(11, 97, 130, bias=False)
    q = (z.double() @ wt.double().T).softmax(-1).sort(-1, descending=True).values
    ref = reference(h, w, None, q, normalizer=11.0, softcap=2.0)
    hh = h.clone().requires_grad_()
    uld_loss(hh, w, softcap=2.0, teacher_z=z, teacher_weight=wt, chunk_size=4).backward()
    assert w.grad is None
    assert_close(hh.grad, ref[1], *TOLERANCES[torch.float32], "grad h")


def test_topk_teacher_pads_with_zeros():
    h, w, b, z, wt = make(13, 211, 400, bias=False)
    logp = (z @ wt.T).log_softmax(-1)
    top = logp.topk(8, dim=-1).values  # (N, K): the stored top-k
    ref = reference(h, w, None, top.exp(), normalizer=13.0)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = uld_loss(hh, ww, teacher_topk_logprobs=top, chunk_size=5)
    loss.backward()
    assert_close(loss, ref[0], 1e-5, 1e-4, "loss")
    assert_close(hh.grad, ref[1], 1e-5, 1e-4, "grad h")
    assert_close(ww.grad, ref[2], 1e-5, 1e-4, "grad w")


def test_identical_distributions_give_zero_and_the_teacher_gets_no_gradient():
    h, w, b, z, wt = make(5, 64, 64, d_t=48, bias=False)
    z = z.new_zeros(5, 48).copy_(h).requires_grad_()
    loss = uld_loss(h, w, teacher_z=z, teacher_weight=w)
    assert loss.item() < 1e-6 and not loss.requires_grad  # no grad wanted for h or w here


def test_bad_arguments_are_named():
    h, w, b, z, wt = make(4, 16, 16)
    with pytest.raises(ValueError, match="not both or neither"):
        uld_loss(h, w)
    with pytest.raises(ValueError, match="shapes disagree"):
        uld_loss(h[:3], w, teacher_z=z, teacher_weight=wt)
