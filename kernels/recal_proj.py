"""The Recalibrator's projections fused with what surrounds them.

`proj_pre`: ProjPre reads teacher features as the store keeps them (bf16 bits as uint16, fp16, fp32) and
converts them on load inside the matmul, so no converted copy of the features is made or kept for backward.
`proj_post_ln`: ProjPost with its LayerNorm; backward recomputes the pre-norm activations from the saved input
(two floats per row are kept, never the (N, D_l) activations).

Math. ProjPre: y = x W^T + b with x frozen, so dW = dy^T x, db = sum_rows dy.
ProjPost + LN: u = h W^T + b, mu = mean(u), rstd = 1 / sqrt(var(u) + eps), xhat = (u - mu) rstd,
y = xhat * gamma + beta. Backward: dxhat = dy * gamma,
du = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dh = du W, dW = du^T h, db = sum du,
dgamma = sum dy * xhat, dbeta = sum dy.
Paths: a Triton matmul kernel with conversion on load and a Triton LayerNorm row kernel (CUDA), chunked
PyTorch (CPU default and fallback), and the naive autograd reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

_CHUNK_ROWS = 4096


def as_features(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored features as `dtype`: uint16 holds bf16 bits (Zarr has no bfloat16)."""
    if x.dtype == torch.uint16:
        x = x.view(torch.bfloat16)
    return x.to(dtype)


# --- Triton kernels -------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _load_as_f32(ptrs, mask, BF16_BITS: tl.constexpr):
        v = tl.load(ptrs, mask=mask, other=0)
        if BF16_BITS:  # bf16 -> fp32 is the 16 bits shifted up: exact, and integer-only
            return (v.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return v.to(tl.float32)

    @triton.jit
    def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                       A_BITS: tl.constexpr, B_BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       DOT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """C (M, N) = A (M, K) @ B (K, N) + bias (N,), converting A and B to fp32 (or bf16) on load."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: offsets can pass 2^31
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = _load_as_f32(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, (rm[:, None] < M) & (kk[None, :] < K),
                             A_BITS)
            b = _load_as_f32(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, (kk[:, None] < K) & (rn[None, :] < N),
                             B_BITS)
            if DOT_BF16:
                acc += tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
            else:
                acc += tl.dot(a, b, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _ln_forward_kernel(u_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, N, eps, BLOCK: tl.constexpr):
        """One row: y = (u - mean) * rstd * w + b, saving mean and rstd."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        u = tl.load(u_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(u, axis=0) / N
        d = tl.where(m, u - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + cols, (d * rstd * w + b).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _ln_backward_kernel(u_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, du_ptr, N, BLOCK: tl.constexpr):
        """One row: du from dy, with xhat recomputed from u and the saved statistics."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        u = tl.load(u_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(m, (u - mean) * rstd, 0.0)
        dxhat = dy * w
        c1 = tl.sum(dxhat, axis=0) / N
        c2 = tl.sum(dxhat * xhat, axis=0) / N
        tl.store(du_ptr + row * N + cols, ((dxhat - c1 - xhat * c2) * rstd).to(du_ptr.dtype.element_ty), mask=m)


def _mm_triton(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
               ) -> torch.Tensor:
    """a (M, K) @ b (K, N) (+ bias) with the Triton kernel; uint16 operands are bf16 bits."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, device=a.device, dtype=out_dtype)
    half = torch.bfloat16 in (a.dtype, b.dtype) or torch.uint16 in (a.dtype, b.dtype)
    dot_bf16 = half and a.is_cuda and not dispatch.INTERPRET
    bm, bn, bk = (64, 64, 64) if a.is_cuda else (32, 32, 32)
    # fp32 x fp16 tiles converted on load spill registers when pipelined (tools/compile_report.py): one stage.
    stages = {"num_stages": 1} if a.dtype != b.dtype and not half else {}
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _matmul_kernel[grid](a, b, c, bias if bias is not None else c, m, n, k, a.stride(0), a.stride(1),
                         b.stride(0), b.stride(1), c.stride(0), c.stride(1), A_BITS=a.dtype == torch.uint16,
                         B_BITS=b.dtype == torch.uint16, HAS_BIAS=bias is not None, DOT_BF16=dot_bf16,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **stages)
    return c


# --- ProjPre ------------------------------------------------------------------------------------------------------

class ProjPreFunction(torch.autograd.Function):
    """y (N, D_s) = features(x) @ W^T + b for frozen stored features x (N, D_l); grads for W (D_s, D_l) and b."""

    @staticmethod
    def forward(ctx, x, weight, bias, use_triton):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.use_triton = bias is not None, use_triton
        if use_triton:
            return _mm_triton(_bits(x), _bits(weight.T), bias, weight.dtype)
        y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=weight.dtype)
        for s in range(0, x.shape[0], _CHUNK_ROWS):  # converts one chunk of features at a time
            y[s : s + _CHUNK_ROWS] = F.linear(as_features(x[s : s + _CHUNK_ROWS], weight.dtype), weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        if ctx.use_triton:
            dw = _mm_triton(_bits(dy.T), _bits(x), None, torch.float32).to(weight.dtype)  # (D_s, D_l)
        else:
            dw = torch.zeros(weight.shape, device=dy.device, dtype=torch.float32)
            for s in range(0, x.shape[0], _CHUNK_ROWS):
                dw += dy[s : s + _CHUNK_ROWS].T.float() @ as_features(x[s : s + _CHUNK_ROWS], torch.float32)
            dw = dw.to(weight.dtype)
        db = dy.float().sum(0).to(weight.dtype) if ctx.has_bias else None
        return None, dw, db, None


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Stored features as the kernel reads them: bf16 as its uint16 bits, other dtypes unchanged."""
    return x.view(torch.uint16) if x.dtype == torch.bfloat16 else x


def proj_pre(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto"
             ) -> torch.Tensor:
    """ProjPre over stored teacher features `x` (N, D_l): uint16 (bf16 bits), bf16, fp16 or fp32."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"features have width {x.shape[-1]}, ProjPre expects {weight.shape[1]}")
    if impl == "naive":
        return F.linear(as_features(x, weight.dtype), weight, bias)
    return ProjPreFunction.apply(x, weight, bias, dispatch.use_triton(impl, x))


# --- ProjPost + LayerNorm -------------------------------------------------------------------------------------

def _ln_forward_torch(u: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    uf = u.float()
    mean = uf.mean(-1)
    rstd = torch.rsqrt(uf.var(-1, unbiased=False) + eps)
    return (uf - mean[:, None]) * rstd[:, None] * w.float() + b.float(), mean, rstd


def _ln_backward_torch(u: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xhat = (u.float() - mean[:, None]) * rstd[:, None]
    dxhat = dy.float() * w.float()
    du = (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd[:, None]
    return du, xhat


class ProjPostLNFunction(torch.autograd.Function):
    """y (N, D_l) = LayerNorm(h @ W^T + b) * gamma + beta, for h (N, D_s) and W (D_l, D_s)."""

    @staticmethod
    def forward(ctx, h, weight, bias, ln_weight, ln_bias, eps, use_triton):
        n, d = h.shape[0], weight.shape[0]
        y = torch.empty(n, d, device=h.device, dtype=h.dtype)
        mean = torch.empty(n, device=h.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        for s in range(0, n, _CHUNK_ROWS):
            e = min(s + _CHUNK_ROWS, n)
            if use_triton:
                u = _mm_triton(_bits(h[s:e]), _bits(weight.T), bias, torch.float32)  # (C, D_l), as in backward
                _ln_forward_kernel[(e - s,)](u, y[s:e], ln_weight, ln_bias, mean[s:e], rstd[s:e], d, eps,
                                             BLOCK=triton.next_power_of_2(d))
            else:
                u = F.linear(h[s:e].float(), weight.float(), None if bias is None else bias.float())  # as in backward
                y[s:e], mean[s:e], rstd[s:e] = _ln_forward_torch(u, ln_weight, ln_bias, eps)
        ctx.save_for_backward(h, weight, bias, ln_weight, mean, rstd)
        ctx.use_triton = use_triton
        return y

    @staticmethod
    def backward(ctx, dy):
        h, weight, bias, ln_weight, mean, rstd = ctx.saved_tensors
        f32 = torch.float32
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, device=h.device, dtype=f32)
        db = torch.zeros(weight.shape[0], device=h.device, dtype=f32)
        dgamma, dbeta = torch.zeros_like(db), torch.zeros_like(db)
        d = weight.shape[0]
        for s in range(0, h.shape[0], _CHUNK_ROWS):  # recompute u chunk by chunk: it is never kept
            e = min(s + _CHUNK_ROWS, h.shape[0])
            dyc = dy[s:e]
            if ctx.use_triton:
                u = _mm_triton(_bits(h[s:e]), _bits(weight.T), bias, f32)
                du = torch.empty_like(u)
                _ln_backward_kernel[(e - s,)](u, dyc.contiguous(), ln_weight, mean[s:e], rstd[s:e], du, d,
                                              BLOCK=triton.next_power_of_2(d))
                xhat = (u - mean[s:e, None]) * rstd[s:e, None]
            else:
                u = F.linear(h[s:e].float(), weight.float(), None if bias is None else bias.float())
                du, xhat = _ln_backward_torch(u, dyc, ln_weight, mean[s:e], rstd[s:e])
            dgamma += (dyc.float() * xhat).sum(0)
            dbeta += dyc.float().sum(0)
            dw += du.T @ h[s:e].float()
            db += du.sum(0)
            dh[s:e] = (du @ weight.float()).to(h.dtype)
        return (dh, dw.to(weight.dtype), None if bias is None else db.to(bias.dtype), dgamma.to(ln_weight.dtype),
                dbeta.to(ln_weight.dtype), None, None)


def proj_post_ln(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor,
                 ln_bias: torch.Tensor, eps: float = 1e-5, impl: str = "auto") -> torch.Tensor:
    """ProjPost (D_s -> D_l) followed by LayerNorm(D_l), as one op."""
    if h.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has width {h.shape[-1]}, ProjPost expects {weight.shape[1]}")
    if impl == "naive":
        return F.layer_norm(F.linear(h, weight, bias), (weight.shape[0],), ln_weight, ln_bias, eps)
    return ProjPostLNFunction.apply(h, weight, bias, ln_weight, ln_bias, eps, dispatch.use_triton(impl, h))
