"""Teacher-head CE + KL without ever materialising the (N, V) logits: the GenRecal distillation loss.

Rows are processed in chunks of C rows: two matmuls give the chunk's logits (C, V), a row kernel (Triton on
CUDA, PyTorch elsewhere) turns them into the loss and, in place, into its gradient, and a third matmul maps that
back onto r. Peak extra memory is O(C * V) for one chunk, never O(N * V).

Math, per row i with mask m_i (target != ignore_index), x = W r + b (pre-activation) and
f(x) = c * tanh(s * x / c) (softcap c, logit scale s; f(x) = s * x without softcap):
    a = f(W r + b),  a_z = f(W z + b)
    CE_i = logsumexp(a) - a[t_i]
    p = softmax(a_z / T),  q = softmax(a / T),  KL_i = sum_v p_v (log p_v - log q_v)
    loss = sum_i m_i (w_ce CE_i + w_kl T^2 KL_i) / n             (n: the caller's normaliser)
    dloss/da = m_i / n * (w_ce (softmax(a) - onehot(t_i)) + w_kl T (q - p))
    dloss/dx = dloss/da * f'(x),  f'(x) = s (1 - tanh^2(s x / c))
    dloss/dr = dloss/dx @ W
The T^2 factor keeps the KL gradient's size independent of T (Hinton et al.).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import dispatch
from .dispatch import HAS_TRITON  # also imported from here by tests and tools

if HAS_TRITON:
    import triton
    import triton.language as tl

_CHUNK_ELEMENTS = 1 << 25  # a chunk's logits hold at most this many fp32 values (128 MiB) on CUDA
_CPU_CHUNK_BYTES = 32 << 20  # elsewhere a (C, V) fp32 slice of a chunk stays under this (tuned on a 2-core EPYC)
_CPU_MIN_ROWS = 256  # ... unless that means fewer rows: smaller matmuls run well below the machine's rate


class CEKLOutput(NamedTuple):
    """`loss` carries the gradient; `ce` and `kl` are its detached parts (already weighted and normalised)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


# --- the row kernel (Triton) ---------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # tanh via exp, stable at both ends (exp overflow gives +-1 exactly)
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _activate(x, scale, softcap, HAS_SOFTCAP: tl.constexpr):
        if HAS_SOFTCAP:
            return softcap * _tanh(x * scale / softcap)
        return x * scale

    @triton.jit
    def _ce_kl_rows_kernel(
        xr_ptr,  # (C, V) fp32 pre-activation logits of r; overwritten with dloss/dx
        xz_ptr,  # (C, V) fp32 pre-activation logits of z
        target_ptr,  # (C,) int64
        row_scale_ptr,  # (C,) fp32: m_i / n (0 for ignored rows)
        ce_ptr,  # (C,) fp32 out: CE_i (unweighted, unnormalised)
        kl_ptr,  # (C,) fp32 out: KL_i (unweighted, unnormalised)
        stride,
        V,
        scale,
        softcap,
        inv_t,
        w_ce,
        w_kl_t,  # w_kl / T: d(T^2 KL)/da = T (q - p), with w_kl already holding the T^2
        HAS_SOFTCAP: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        xr_ptr += row * stride
        xz_ptr += row * stride
        t = tl.load(target_ptr + row)
        rs = tl.load(row_scale_ptr + row)
        # Pass 1: online max / sum-exp for a (T=1), a/T and a_z/T, the target logit, and E_p[(a_z - a)/T].
        m_a = float("-inf")
        s_a = 0.0
        m_q = float("-inf")
        s_q = 0.0
        m_p = float("-inf")
        s_p = 0.0
        acc = 0.0
        a_t = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            valid = offs < V
            a = _activate(tl.load(xr_ptr + offs, mask=valid, other=0.0), scale, softcap, HAS_SOFTCAP)
            az = _activate(tl.load(xz_ptr + offs, mask=valid, other=0.0), scale, softcap, HAS_SOFTCAP)
            d = (az - a) * inv_t  # finite on masked lanes too (both load as 0)
            a = tl.where(valid, a, float("-inf"))
            aq = a * inv_t
            ap = tl.where(valid, az * inv_t, float("-inf"))
            a_t += tl.sum(tl.where(offs == t, a, 0.0))
            new_m = tl.maximum(m_a, tl.max(a))
            s_a = s_a * tl.exp(m_a - new_m) + tl.sum(tl.exp(a - new_m))
            m_a = new_m
            new_m = tl.maximum(m_q, tl.max(aq))
            s_q = s_q * tl.exp(m_q - new_m) + tl.sum(tl.exp(aq - new_m))
            m_q = new_m
            new_m = tl.maximum(m_p, tl.max(ap))
            w = tl.exp(ap - new_m)
            r = tl.exp(m_p - new_m)
            s_p = s_p * r + tl.sum(w)
            acc = acc * r + tl.sum(tl.where(w > 0.0, w * d, 0.0))  # p = 0 adds nothing, even at -inf logits
            m_p = new_m
        lse_a = m_a + tl.log(s_a)
        lse_q = m_q + tl.log(s_q)
        lse_p = m_p + tl.log(s_p)
        active = rs != 0.0
        tl.store(ce_ptr + row, tl.where(active, lse_a - a_t, 0.0))
        tl.store(kl_ptr + row, tl.where(active, acc / s_p - lse_p + lse_q, 0.0))
        # Pass 2: the gradient, written over the logits of r.
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            valid = offs < V
            x = tl.load(xr_ptr + offs, mask=valid, other=0.0)
            a = _activate(x, scale, softcap, HAS_SOFTCAP)
            az = _activate(tl.load(xz_ptr + offs, mask=valid, other=0.0), scale, softcap, HAS_SOFTCAP)
            sm = tl.exp(a - lse_a)
            q = tl.exp(a * inv_t - lse_q)
            p = tl.exp(az * inv_t - lse_p)
            g = w_ce * (sm - tl.where(offs == t, 1.0, 0.0)) + w_kl_t * (q - p)
            if HAS_SOFTCAP:
                th = _tanh(x * scale / softcap)
                g = g * scale * (1.0 - th * th)
            else:
                g = g * scale
            tl.store(xr_ptr + offs, g * rs, mask=valid)


def _rows_triton(xr: torch.Tensor, xz: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                 scale: float, softcap: float | None, temperature: float, w_ce: float, w_kl: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses CE_i, KL_i (C,) and dloss/dx written into `xr` (C, V), by the Triton kernel. `w_kl` is the
    effective KL weight (kl_weight * T^2)."""
    c, v = xr.shape
    ce = torch.empty(c, device=xr.device, dtype=torch.float32)
    kl = torch.empty_like(ce)
    block = min(triton.next_power_of_2(v), 4096 if xr.is_cuda else 1 << 16)
    _ce_kl_rows_kernel[(c,)](
        xr, xz, targets, row_scale, ce, kl, xr.stride(0), v, float(scale), float(softcap or 1.0),
        1.0 / temperature, float(w_ce), float(w_kl / temperature), HAS_SOFTCAP=softcap is not None,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return ce, kl


# --- the row kernel (PyTorch) ---------------------------------------------------------------------------------

def _softmax_lse(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """softmax(x) (C, V) written into `out`, and logsumexp(x) (C,) returned, with no (C, V) temporary: the
    softmax's largest value is exp(0) / sum, so lse = max(x) - log(max(softmax(x)))."""
    m = x.amax(-1)  # (C,)
    torch.softmax(x, -1, out=out)
    return m - out.amax(-1).log()


def _rows_torch(xr: torch.Tensor, xz: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                scale: float, softcap: float | None, temperature: float, w_ce: float, w_kl: float,
                work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `_rows_triton`, in PyTorch: row losses CE_i, KL_i (C,), and dloss/dx written into `xr` (C, V);
    `xz` is overwritten too. `work`: fp32 scratch of at least (2C, V), allocated when None.

    Every step is a pass over (C, V) floats, so there are few: one softmax per side (log-sum-exps from
    `_softmax_lse`), no log-probabilities (KL_i = E_p[(a_z - a) / T] - lse_p + lse_q), at T = 1 q = softmax(a)
    reused, and the gradient built from per-row coefficients in two fused passes."""
    c, v = xr.shape
    if work is None:
        work = torch.empty(2 * c, v, device=xr.device, dtype=torch.float32)
    sm, p = work[:c], work[c:2 * c]  # (C, V) each: softmax(a), softmax(a_z / T)
    inv_t = 1.0 / temperature
    if softcap is not None:  # a into xr, a_z / T into xz
        xr.mul_(scale / softcap).tanh_().mul_(softcap)
        xz.mul_(scale / softcap).tanh_().mul_(softcap * inv_t)
    else:
        if scale != 1.0:
            xr.mul_(scale)
        if scale * inv_t != 1.0:
            xz.mul_(scale * inv_t)
    lse_a = _softmax_lse(xr, sm)  # (C,)
    lse_p = _softmax_lse(xz, p)  # (C,)
    safe_t = targets.clamp(min=0).unsqueeze(1)  # (C, 1); ignored rows: any index, masked below
    ce = lse_a - xr.gather(1, safe_t).squeeze(1)
    # E_p[(a_z - a) / T]: nansum drops p = 0 times -inf (a masked vocabulary), which must add nothing
    kl_dot = xz.sub_(xr, alpha=inv_t).mul_(p).nansum(-1)  # (C,); xz is free from here on
    k = row_scale * scale  # (C,): m_i / n * s, the row's factor in dloss/dx
    # dloss/dx = k (w_ce (softmax(a) - onehot) + w_kl / T (q - p)) f'(x) / s; at T = 1 the q term joins softmax(a)
    g = xr if softcap is None and temperature == 1.0 else sm  # xr still holds a when q or f' needs it
    torch.mul(sm, (k * (w_ce + w_kl if temperature == 1.0 else w_ce)).unsqueeze(1), out=g)
    g.addcmul_(p, (k * (-w_kl * inv_t)).unsqueeze(1))
    lse_q = lse_a
    if temperature != 1.0:
        lse_q = _softmax_lse(torch.mul(xr, inv_t, out=xz), p)  # q = softmax(a / T) in p's place
        g.addcmul_(p, (k * (w_kl * inv_t)).unsqueeze(1))
    g.scatter_add_(1, safe_t, (k * -w_ce).unsqueeze(1))
    if softcap is not None:  # f'(x) / s = 1 - tanh^2 = 1 - (a / c)^2
        torch.addcmul(xr.new_ones(()), xr, xr, value=-1.0 / softcap**2, out=xr).mul_(g)
    elif g is not xr:
        xr.copy_(g)
    active = row_scale != 0
    return torch.where(active, ce, 0.0), torch.where(active, kl_dot - lse_p + lse_q, 0.0)


# --- the chunk loop and the autograd Function -----------------------------------------------------------------

def _chunk_rows(n: int, v: int, device: torch.device | str) -> int:
    """Rows per chunk of an (N, V) problem. CUDA: as many as keep a chunk's logits under `_CHUNK_ELEMENTS` (few,
    large matmuls). Elsewhere: as many as keep a (C, V) fp32 slice under `_CPU_CHUNK_BYTES`, but at least
    `_CPU_MIN_ROWS` (the matmuls slow down below that)."""
    if torch.device(device).type == "cuda":
        rows = _CHUNK_ELEMENTS // v
    else:
        rows = max(_CPU_MIN_ROWS, _CPU_CHUNK_BYTES // (4 * v))
    return max(1, min(n, rows))


def _pre_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + b as fp32 (M, V), into `out` (M, V) where given. Half-precision inputs multiply in their dtype;
    the product is kept in fp32 where torch can (CUDA, `dispatch.MM_OUT_DTYPE`; `out` unused), else rounded to the
    input dtype first (as Liger-Kernel does)."""
    x = x.to(weight.dtype)
    if weight.dtype == torch.float32:
        return torch.mm(x, weight.T, out=out) if bias is None else torch.addmm(bias.float(), x, weight.T, out=out)
    if dispatch.MM_OUT_DTYPE and x.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
        out = torch.mm(x, weight.T, out_dtype=torch.float32)
    elif out is None:
        out = (x @ weight.T).float()
    else:
        out.copy_(x @ weight.T)
    if bias is not None:
        out += bias.float()
    return out


def ce_kl_forward(r: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  bias: torch.Tensor | None, logit_scale: float | None, softcap: float | None,
                  temperature: float, ce_weight: float, kl_weight: float, ignore_index: int,
                  normalizer: float, chunk_size: int | None, use_triton: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_sum, kl_sum, grad_r): weighted, normalised loss parts and dloss/dr, one row chunk at a time. Off CUDA the
    chunk buffers are allocated once and reused: a fresh CPU allocation is page-faulted in on every chunk."""
    n, _ = r.shape
    v = weight.shape[0]
    chunk = max(1, min(n, chunk_size or _chunk_rows(n, v, r.device)))
    grad_r = torch.zeros_like(r)
    ce_sum = torch.zeros((), device=r.device, dtype=torch.float32)
    kl_sum = torch.zeros_like(ce_sum)
    scale = 1.0 if logit_scale is None else float(logit_scale)
    kl_w = kl_weight * temperature**2
    reuse = not r.is_cuda
    x_buf = torch.empty(2 * chunk, v, device=r.device, dtype=torch.float32) if reuse else None  # (2C, V)
    work = torch.empty_like(x_buf) if reuse and not use_triton else None  # (2C, V): `_rows_torch` scratch
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        c = e - s
        t = targets[s:e]
        row_scale = (t != ignore_index).to(torch.float32) / normalizer  # (C,)
        if not bool(row_scale.any()):
            continue
        x = _pre_activation(torch.cat([r[s:e], z[s:e]]), weight, bias,
                            None if x_buf is None else x_buf[:2 * c])  # (2C, V): r's rows, then z's
        xr, xz = x[:c], x[c:]  # (C, V) each
        if use_triton:
            ce, kl = _rows_triton(xr, xz, t, row_scale, scale, softcap, temperature, ce_weight, kl_w)
        else:
            ce, kl = _rows_torch(xr, xz, t, row_scale, scale, softcap, temperature, ce_weight, kl_w,
                                 None if work is None else work[:2 * c])
        ce_sum += (ce * row_scale).sum() * ce_weight
        kl_sum += (kl * row_scale).sum() * kl_w
        grad_r[s:e] = (xr.to(weight.dtype) @ weight).to(r.dtype)  # (C, D); xr now holds dloss/dx
    return ce_sum, kl_sum, grad_r


class FusedLinearCEKLFunction(torch.autograd.Function):
    """loss(r) = sum_i m_i (w_ce CE(W r_i, t_i) + w_kl T^2 KL(softmax(W z_i / T) || softmax(W r_i / T))) / n.

    r (N, D) needs a gradient; z (N, D), W (V, D), b (V,) are frozen. The gradient is computed in the forward
    (as Liger-Kernel does) and scaled by grad_output in the backward; no (N, V) tensor ever exists.
    """

    @staticmethod
    def forward(ctx, r, z, weight, targets, bias, logit_scale, softcap, temperature, ce_weight, kl_weight,
                ignore_index, normalizer, chunk_size, use_triton):
        ce, kl, grad_r = ce_kl_forward(r, z, weight, targets, bias, logit_scale, softcap, temperature, ce_weight,
                                       kl_weight, ignore_index, normalizer, chunk_size, use_triton)
        ctx.save_for_backward(grad_r)
        ctx.mark_non_differentiable(ce, kl)
        return ce + kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad_r,) = ctx.saved_tensors
        return (grad_r * grad_loss.to(grad_r.dtype),) + (None,) * 13


def naive_linear_ce_kl(r: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: torch.Tensor | None = None, logit_scale: float | None = None,
                       softcap: float | None = None, temperature: float = 1.0, ce_weight: float = 1.0,
                       kl_weight: float = 1.0, ignore_index: int = -100, normalizer: float = 1.0) -> CEKLOutput:
    """The same loss with full (N, V) fp32 logits and autograd: the reference for tests and benchmarks."""
    def act(x: torch.Tensor) -> torch.Tensor:
        x = x.float() @ weight.float().T + (bias.float() if bias is not None else 0.0)
        x = x * (1.0 if logit_scale is None else logit_scale)
        return softcap * torch.tanh(x / softcap) if softcap is not None else x

    a, az = act(r), act(z)  # (N, V)
    mask = (targets != ignore_index).float()
    ce = torch.nn.functional.cross_entropy(a, targets.clamp(min=0), reduction="none")
    log_q = torch.log_softmax(a / temperature, -1)
    log_p = torch.log_softmax(az / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = (ce * mask).sum() * ce_weight / normalizer
    kl = (kl * mask).sum() * kl_weight * temperature**2 / normalizer
    return CEKLOutput(ce + kl, ce.detach(), kl.detach())


def fused_linear_ce_kl(r: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       bias: torch.Tensor | None = None, logit_scale: float | None = None,
                       softcap: float | None = None, temperature: float = 1.0, ce_weight: float = 1.0,
                       kl_weight: float = 1.0, ignore_index: int = -100, normalizer: float | None = None,
                       impl: str = "auto", chunk_size: int | None = None) -> CEKLOutput:
    """GenRecal's teacher-head loss of Recalibrator outputs `r` (N, D) against cached teacher features `z`.

    `normalizer`: the global count of label tokens (default: this call's non-ignored targets, at least 1).
    `impl`: "auto" (Triton on CUDA when installed, else chunked PyTorch), "triton", "chunked" or "naive".
    """
    dispatch.check_impl(impl)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if r.shape != z.shape or r.shape[1] != weight.shape[1] or targets.shape != r.shape[:1]:
        raise ValueError(f"shapes disagree: r {tuple(r.shape)}, z {tuple(z.shape)}, weight "
                         f"{tuple(weight.shape)}, targets {tuple(targets.shape)}")
    active = targets != ignore_index
    if bool(((targets[active] < 0) | (targets[active] >= weight.shape[0])).any()):
        raise ValueError(f"targets must be in [0, {weight.shape[0]}) or ignore_index ({ignore_index})")
    if normalizer is None:
        normalizer = max(1, int(active.sum()))
    normalizer = float(normalizer)
    if not normalizer > 0 or not math.isfinite(normalizer):
        raise ValueError(f"normalizer must be a positive count, got {normalizer}")
    if impl == "naive":
        return naive_linear_ce_kl(r, z, weight, targets, bias, logit_scale, softcap, temperature, ce_weight,
                                  kl_weight, ignore_index, normalizer)
    loss, ce, kl = FusedLinearCEKLFunction.apply(
        r, z.detach(), weight.detach(), targets, None if bias is None else bias.detach(), logit_scale, softcap,
        float(temperature), float(ce_weight), float(kl_weight), ignore_index, normalizer, chunk_size,
        dispatch.use_triton(impl, r))
    return CEKLOutput(loss, ce, kl)
