"""tools/bench_fp8.py's fidelity figures against a hand computation, and the synthetic check's targets."""

from __future__ import annotations

import math

import pytest
import torch
from bench_fp8 import head_figures

from genrecal_cache.store.head import TeacherHead


def test_head_figures_match_a_hand_computation():
    head = TeacherHead(torch.eye(3))  # logits = the features
    ref = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    test = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    out = head_figures(head, ref, test, targets, chunk=1)
    p = torch.softmax(ref[0].double(), -1)
    kl0 = float((p * (p.log() - torch.log_softmax(test[0].double(), -1))).sum())
    assert out["tokens"] == 2 and out["kl_mean"] == pytest.approx(kl0 / 2, rel=1e-12)
    assert out["top1_agreement"] == 0.5  # the first row's argmax moved, the second's did not
    assert out["decided_tokens"] == 2 and out["top1_agreement_decided"] == 0.5  # both lead by more than 1%
    tie = head_figures(head, torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.001, 0.0]]), torch.tensor([0]))
    assert tie["top1_agreement"] == 0 and tie["decided_tokens"] == 0  # a tie at the top flips, and is not decided
    assert out["dlogp_target_mean"] == pytest.approx(1.0 / 2, rel=1e-12)  # log p(2) changes by exactly 1
    assert 0 < out["kl_p999"] <= kl0 and math.isfinite(out["kl_p999"])
    same = head_figures(head, ref, ref.clone(), targets)
    assert same["kl_mean"] == 0 and same["top1_agreement"] == 1 and same["dlogp_target_mean"] == 0


def test_non_finite_figures_are_refused():
    with pytest.raises(AssertionError, match="non-finite"):
        head_figures(TeacherHead(torch.eye(2)), torch.zeros(1, 2), torch.tensor([[float("nan"), 0.0]]),
                     torch.tensor([0]))
