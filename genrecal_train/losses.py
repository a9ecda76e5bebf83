"""GenRecal's losses as plain functions: the Recalibrator's CE + KL on the frozen teacher head (one call site
of the fused kernel), the student's own next-token CE, and the ULD baseline's loss.
"""

from __future__ import annotations

import torch

from genrecal_cache.store.head import TeacherHead
from genrecal_kernels import CEKLOutput, fused_linear_ce_kl, uld_loss


def teacher_head_loss(r: torch.Tensor, teacher_features: torch.Tensor, targets: torch.Tensor, head: TeacherHead,
                      normalizer: float, temperature: float = 1.0, ce_weight: float = 1.0, kl_weight: float = 1.0,
                      impl: str = "auto") -> CEKLOutput:
    """L_ar + L_kl of Recalibrator outputs `r` (A, D_l) on the frozen teacher head, against the cached teacher
    features (A, D_l) and targets (A,), summed over tokens and divided by `normalizer` (the global count of
    label tokens). The one call site of the fused kernel."""
    z = teacher_features.to(r.dtype)
    return fused_linear_ce_kl(r, z, head.weight.to(r.dtype), targets, bias=head.bias,
                              logit_scale=head.logit_scale, softcap=head.softcap, temperature=temperature,
                              ce_weight=ce_weight, kl_weight=kl_weight, normalizer=normalizer, impl=impl)


def student_loss(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor,
                 normalizer: float, logit_scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """L_s: the student's CE at its own label positions (label_mask[b, p]: token p+1 is an answer token),
    summed and divided by `normalizer`, on the logits the student itself computes (its `logit_scale` and final
    softcap, `genrecal_cache.core.models.head_scaling`). Logits exist only at the label positions (n, V_s), never
    (B, L, V_s)."""
    selected = hidden[label_mask]  # (n, D_s)
    targets = input_ids.roll(-1, dims=1)[label_mask]  # (n,): the token after each label position
    logits = head(selected).float()  # (n, V_s)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / max(float(normalizer), 1.0)


def uld_student_loss(hidden: torch.Tensor, student_head: torch.nn.Module, head: TeacherHead, normalizer: float,
                     teacher_z: torch.Tensor | None = None, teacher_topk_logprobs: torch.Tensor | None = None,
                     logit_scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """ULD (sorted-probability L1) of the student's distributions at aligned positions, `hidden` (n, D_s),
    (its own logits: `logit_scale`, `softcap`) against the teacher's: head(teacher_z) over its full vocabulary,
    or its stored top-k (n, K). Summed and divided by `normalizer` (the global count of aligned pairs); never
    more than a chunk of either vocabulary."""
    kw = dict(bias=getattr(student_head, "bias", None), normalizer=max(float(normalizer), 1.0),
              logit_scale=logit_scale, softcap=softcap)
    if teacher_z is not None:
        return uld_loss(hidden, student_head.weight, teacher_z=teacher_z, teacher_weight=head.weight,
                        teacher_bias=head.bias, teacher_logit_scale=head.logit_scale, teacher_softcap=head.softcap,
                        **kw)
    return uld_loss(hidden, student_head.weight, teacher_topk_logprobs=teacher_topk_logprobs, **kw)
