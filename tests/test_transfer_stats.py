"""The transfer experiment's registered statistics (tools/transfer_experiment.py): Holm's correction, the paired
t-tests and intervals, the choice of the primary baseline and the verdict's three conditions."""

from __future__ import annotations

import math
import statistics

import pytest
from transfer_experiment import ARMS, analyse, holm

PAIRS = [(t, s) for t in (0, 1) for s in range(5)]


def _rows(diffs: dict[str, list[float]], base: float = 0.8) -> list[dict]:
    """Rows where `genrecal` is `base` and each other arm is `base - diff` per seed pair."""
    rows = [{"arm": "genrecal", "teacher_seed": t, "student_seed": s, "test_accuracy": base} for t, s in PAIRS]
    for arm in (a.name for a in ARMS if a.name != "genrecal"):
        d = diffs.get(arm, [0.0] * 10)
        rows += [{"arm": arm, "teacher_seed": t, "student_seed": s, "test_accuracy": base - d[i]}
                 for i, (t, s) in enumerate(PAIRS)]
    return rows


def test_holm_matches_a_hand_computed_example():
    # sorted 0.01, 0.03, 0.04, 0.2 -> 4*0.01, 3*0.03, max(2*0.04, 0.09), max(0.2, 0.09)
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_primary_is_against_the_better_sft_arm_with_a_one_sided_paired_t_test():
    gains = [0.03, 0.04, 0.02, 0.05, 0.03, 0.01, 0.04, 0.03, 0.02, 0.06]
    rows = _rows({"sft-answers": [g + 0.02 for g in gains], "sft-answers-sched": gains})
    arms, comps, verdict = analyse(rows)
    assert verdict["baseline"] == "sft-answers-sched"  # the higher mean of the two SFT-on-answers arms
    prim = next(c for c in comps if c["role"] == "primary")
    assert prim["comparison"] == "genrecal - sft-answers-sched" and prim["wins"] == 10
    n, m, sd = 10, statistics.mean(gains), statistics.stdev(gains)
    t = m / (sd / math.sqrt(n))
    from scipy import stats

    assert prim["p"] == pytest.approx(stats.t.sf(t, n - 1), rel=1e-9)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert (prim["ci_low"], prim["ci_high"]) == pytest.approx((m - half, m + half))
    assert verdict["primary_met"]
    genrecal = next(a for a in arms if a["arm"] == "genrecal")
    assert genrecal["sd"] == 0.0 and genrecal["n"] == 10
    assert all(c["p_holm"] >= c["p"] for c in comps)
    assert next(c for c in comps if c["role"] == "secondary")["p"] == 1.0  # no difference at all


@pytest.mark.parametrize("gains, why", [
    ([0.05] * 7 + [-0.01, -0.01, -0.01], "only 7 of 10 positive"),
    ([0.019, 0.02, 0.018, 0.021, 0.019, 0.02, 0.018, 0.019, 0.02, 0.019], "mean below +2.0 points"),
])
def test_primary_needs_all_three_conditions(gains, why):
    _, comps, verdict = analyse(_rows({"sft-answers": gains, "sft-answers-sched": [g + 0.01 for g in gains]}))
    assert verdict["baseline"] == "sft-answers"
    assert not verdict["primary_met"], why


def _fraction_rows(diffs: dict[str, list[float]], base: float = 0.6) -> list[dict]:
    """tools/variant_experiment.py's rows: F=1 at `base`, each other arm `base + diff` per seed pair."""
    from variant_experiment import ARMS as FRACTION_ARMS

    return [{"arm": arm, "teacher_seed": t, "student_seed": s,
             "test_accuracy": base + (diffs.get(arm, [0.0] * 10)[i] if arm != "F=1" else 0.0)}
            for arm in FRACTION_ARMS for i, (t, s) in enumerate(PAIRS)]


@pytest.mark.parametrize("diffs, says", [
    ({"no-regularizer": [-0.03, -0.04, -0.02, -0.05, -0.03, -0.01, -0.04, -0.03, -0.02, -0.06],
      "F=0.1": [0.01, -0.01] * 5, "F=0.25": [0.0] * 10}, "F=0.1: within the registered margin"),
    ({"no-regularizer": [-0.03, -0.04, -0.02, -0.05, -0.03, -0.01, -0.04, -0.03, -0.02, -0.06],
      "F=0.1": [-0.04, -0.05] * 5, "F=0.25": [0.0, -0.01] * 5}, "F=0.25: within the registered margin"),
    ({"no-regularizer": [-0.03, -0.04, -0.02, -0.05, -0.03, -0.01, -0.04, -0.03, -0.02, -0.06],
      "F=0.1": [-0.04, -0.05] * 5, "F=0.25": [-0.02, -0.03] * 5}, "F=1: the smaller fractions lose more"),
    ({"no-regularizer": [0.02, -0.02] * 5}, "the regularizer showed no measurable effect"),
])
def test_the_question_fraction_experiments_registered_rule(diffs, says):
    from variant_experiment import analyse as fraction_analyse
    from variant_experiment import recommendation

    arms, comps = fraction_analyse(_fraction_rows(diffs))
    assert [c["comparison"] for c in comps] == ["F=0.25 - F=1", "F=0.1 - F=1", "no-regularizer - F=1"]
    assert all(c["p_holm"] >= c["p"] for c in comps) and len(arms) == 4
    assert recommendation(comps).startswith(says), recommendation(comps)
