"""Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030) from a student's hidden states, in row
chunks: no more than one chunk of either vocabulary's probabilities exists at once, forward or backward.

Math. Per aligned row: p = softmax(f(h W_s^T + b_s)) over the student vocabulary (V_s), where f is the student's
own logit function (f(x) = c * tanh(s * x / c) with softcap c and logit scale s, f(x) = s * x without softcap),
q the teacher's distribution (softmax of its head over V_t, or its stored top-k probabilities, zero elsewhere).
With p↓, q↓ each sorted in decreasing order and the shorter padded with zeros, loss_row = sum_j |p↓_j - q↓_j|.
Backward: g↓_j = sign(p↓_j - q↓_j) (1 on the student's padded tail), g = g↓ scattered back through the sort's
permutation, da = p * (g - <g, p>) (the softmax Jacobian), dx = da * f'(x) with f'(x) = s (1 - (a / c)^2),
dh = dx W_s, dW_s = dx^T h, db_s = sum_rows dx. The loss is summed over rows and divided by `normalizer`.
The teacher never gets a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHUNK_ELEMENTS = 1 << 22  # a chunk holds at most this many probabilities per vocabulary (16 MiB in fp32)


@dataclass
class ULDTeacher:
    """The teacher side: its final features `z` (N, D_l) and head (the full distribution), or its stored top-k
    log-probabilities (N, K). Never differentiated."""

    z: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # (V_t, D_l)
    bias: torch.Tensor | None = None
    logit_scale: float | None = None
    softcap: float | None = None
    topk_logprobs: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """Entries of a teacher probability vector: V_t, or K."""
        return self.weight.shape[0] if self.topk_logprobs is None else self.topk_logprobs.shape[1]

    def sorted_probs(self, s: int, e: int) -> torch.Tensor:
        """Rows [s, e) of the teacher's probabilities, sorted in decreasing order: (C, V_t) or (C, K)."""
        if self.topk_logprobs is not None:
            return self.topk_logprobs[s:e].float().exp().sort(dim=-1, descending=True).values
        logits = self.z[s:e].float() @ self.weight.float().T  # (C, V_t)
        if self.bias is not None:
            logits += self.bias.float()
        if self.logit_scale is not None:
            logits *= self.logit_scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits.softmax(-1).sort(dim=-1, descending=True).values


def _rows(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor,
          scale: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses (C,) and dloss/dx (C, V_s) of one chunk (x = h W_s^T + b_s with `weight` in fp32, before the
    student's logit scale and softcap), against sorted teacher probabilities q."""
    logits = h.float() @ weight.T  # (C, V_s): x, then a = f(x) in place
    if bias is not None:
        logits += bias.float()
    if scale != 1.0:
        logits *= scale
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    p = logits.softmax(-1)
    p_sorted, perm = p.sort(dim=-1, descending=True)
    m = min(p.shape[-1], q.shape[-1])
    diff = p_sorted[:, :m] - q[:, :m]
    loss = diff.abs().sum(-1) + p_sorted[:, m:].sum(-1) + q[:, m:].sum(-1)  # (C,)
    g_sorted = torch.ones_like(p_sorted)  # the student's tail beyond the teacher's vocabulary: |p - 0|
    g_sorted[:, :m] = diff.sign()
    g = torch.empty_like(p).scatter_(1, perm, g_sorted)  # back to vocabulary order
    dlogits = p * (g - (g * p).sum(-1, keepdim=True))  # (C, V_s): dloss/da
    if softcap is not None:  # f'(x) / s = 1 - tanh^2 = 1 - (a / c)^2
        dlogits *= 1.0 - (logits / softcap).square_()
    if scale != 1.0:
        dlogits *= scale
    return loss, dlogits


def uld_forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, teacher: ULDTeacher,
                normalizer: float, chunk_size: int | None, scale: float = 1.0, softcap: float | None = None,
                grad_weight: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss and the gradients of h (N, D_s), W_s (V_s, D_s; None unless `grad_weight`: a frozen head, as under
    LoRA) and b_s, chunk by chunk; `scale` and `softcap`: the student's own logit function."""
    n = h.shape[0]
    v = max(weight.shape[0], teacher.width)
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // v)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.zeros_like(h, dtype=torch.float32)
    w = weight.float()  # once, not per chunk
    grad_w = torch.zeros_like(w) if grad_weight else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        q = teacher.sorted_probs(s, e)
        rows, dlogits = _rows(h[s:e], w, bias, q, scale, softcap)
        loss += rows.sum()
        grad_h[s:e] = dlogits @ w
        if grad_w is not None:
            grad_w += dlogits.T @ h[s:e].float()
        if grad_b is not None:
            grad_b += dlogits.sum(0)
    k = 1.0 / max(float(normalizer), 1.0)
    return (loss * k, grad_h * k, None if grad_w is None else grad_w * k, None if grad_b is None else grad_b * k)


class ULDLossFunction(torch.autograd.Function):
    """loss = sum over rows of the sorted-probability L1 distance / normalizer; gradients for h, W_s, b_s were
    computed in forward (each chunk's probabilities are dropped at once) and scaled by grad_output here."""

    @staticmethod
    def forward(ctx, h, weight, bias, teacher, normalizer, chunk_size, scale, softcap):
        loss, gh, gw, gb = uld_forward(h, weight, bias, teacher, normalizer, chunk_size, scale, softcap,
                                       grad_weight=ctx.needs_input_grad[1])
        ctx.has_w, ctx.has_bias = gw is not None, gb is not None
        ctx.save_for_backward(gh.to(h.dtype), *([gw.to(weight.dtype)] if ctx.has_w else []),
                              *([gb.to(bias.dtype)] if ctx.has_bias else []))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gh, *rest = ctx.saved_tensors
        gw = rest.pop(0) * grad_loss if ctx.has_w else None
        gb = rest.pop(0) * grad_loss if ctx.has_bias else None
        return gh * grad_loss, gw, gb, None, None, None, None, None


def uld_loss(h: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
             logit_scale: float | None = None, softcap: float | None = None,
             teacher_z: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
             teacher_bias: torch.Tensor | None = None, teacher_logit_scale: float | None = None,
             teacher_softcap: float | None = None, teacher_topk_logprobs: torch.Tensor | None = None,
             normalizer: float | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """ULD loss of student hidden states `h` (N, D_s) under the student head `weight` (V_s, D_s) (+ `bias`,
    then the student's own `logit_scale` and `softcap`), against the teacher's full distribution (`teacher_z`
    (N, D_l) through `teacher_weight` (V_t, D_l), with its bias / logit scale / softcap) or its stored top-k
    (`teacher_topk_logprobs` (N, K)). `normalizer`: what the summed loss is divided by (default: N, at least 1)."""
    full = teacher_z is not None
    if full == (teacher_topk_logprobs is not None):
        raise ValueError("give the teacher as teacher_z + teacher_weight (full distribution) or as "
                         "teacher_topk_logprobs, not both or neither")
    rows = teacher_z if full else teacher_topk_logprobs
    if rows.shape[0] != h.shape[0] or h.shape[1] != weight.shape[1]:
        raise ValueError(f"shapes disagree: h {tuple(h.shape)}, weight {tuple(weight.shape)}, teacher rows "
                         f"{tuple(rows.shape)}")
    if full and (teacher_weight is None or teacher_weight.shape[1] != teacher_z.shape[1]):
        raise ValueError("teacher_weight (V_t, D_l) must match teacher_z (N, D_l)")
    teacher = ULDTeacher(teacher_z, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap,
                         teacher_topk_logprobs)
    normalizer = h.shape[0] if normalizer is None else normalizer
    return ULDLossFunction.apply(h, weight, bias, teacher, float(normalizer), chunk_size,
                                 1.0 if logit_scale is None else float(logit_scale), softcap)
