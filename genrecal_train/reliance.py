"""The student-reliance check: does the Recalibrator read the student? First-answer-token accuracy on held-out
samples with each sample's own student features, and with another sample's; equal accuracies mean the student's
features carry no signal (the copying trap of docs/DESIGN.md, "Recalibrator sequence").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from genrecal_cache.store.head import TeacherHead

from .data import TrainSample
from .recalibrator import AnswerInputs, Recalibrator
from .sequence import SlotSample, build_batch, student_question_inputs, teacher_answer_inputs


@torch.no_grad()
def student_reliance(samples: list[TrainSample], features: Callable[[list[TrainSample]], list[torch.Tensor]],
                     recal: Recalibrator, head: TeacherHead, answer_inputs: AnswerInputs,
                     embed: torch.Tensor | None, impl: str, device: torch.device, dtype: torch.dtype,
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
    """`features(samples)`: the student's final features per sample (L_i, D_s). Needs 2 samples or more."""
    if len(samples) < 2:
        return {"reliance_samples": len(samples)}
    feats = features(samples)
    accs = {}
    for name, shift in (("own", 0), ("shuffled", 1)):
        correct = 0
        for i, s in enumerate(samples):
            j = (i + shift) % len(samples)
            q = student_question_inputs(feats[j], samples[j].student.segments)[:1]  # the first answer only
            slot = SlotSample(q, [teacher_answer_inputs(s.teacher, answer_inputs, embed)[0]])
            with autocast():
                r = recal(build_batch([slot], feats[j].shape[-1], device, dtype), impl=impl)
            pred = head.logits(r[:1]).argmax(-1)
            correct += int(pred.item() == s.teacher.targets[0].item())
        accs[name] = correct / len(samples)
    return {"reliance_own_acc": accs["own"], "reliance_shuffled_acc": accs["shuffled"],
            "reliance_samples": len(samples)}
