"""Store variants of GenRecal in the transfer experiment's setting (its teachers, stores, seeds and GenRecal's LR),
each against a baseline variant, 10 seed pairs:
  question-fraction  registered (docs/experiment.md#the-question-features-fraction-pre-registration): the
                     regularizer over question features of every sample, of a quarter, of a tenth; none
  fp8                --feature-dtype bfloat16 against fp8 (issue 24: the student from an fp8 store)

Phases, each resumable (stores keep DONE, students their result.json):
  reuse     the transfer experiment's gate, teachers and stores in the same work folder (made if missing)
  stores    the teacher-answered student set again with each variant's cache-teacher options
  seeds     every variant over the 10 registered seed pairs, scored on the test set
  report    per-variant mean, sample SD and 95% t-interval; paired differences to the baseline with Holm's
            correction; bytes
Run: python tools/experiment.py --preset question-fraction OUT   (or --preset fp8)
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer_experiment import (
    STUDENT_SEEDS,
    TEACHER_SEEDS,
    _interval,
    _store_job,
    _student,
    _students,
    _write_csv,
    gate,
    holm,
    make_stores,
    store_job,
)


@dataclass(frozen=True)
class Variant:
    """One arm: its store's cache-teacher options ({}: the transfer experiment's own store) under a name of its
    own (`tag`), and its train-student options beside the LR."""

    name: str
    store: dict[str, Any] = field(default_factory=dict)
    tag: str = ""
    flags: dict[str, Any] = field(default_factory=dict)


PRESETS = {  # the first variant is the baseline; (run-name prefix, variants)
    "question-fraction": ("qf", [Variant("F=1"),
                                 Variant("F=0.25", {"question_features_fraction": 0.25}, "qf0.25"),
                                 Variant("F=0.1", {"question_features_fraction": 0.1}, "qf0.1"),
                                 Variant("no-regularizer", flags={"regularizer": False})]),
    "fp8": ("fp8", [Variant("bf16", {"feature_dtype": "bfloat16"}, "bf16"),
                    Variant("fp8", {"feature_dtype": "fp8"}, "fp8")]),
}
ARMS = tuple(v.name for v in PRESETS["question-fraction"][1])  # the registered arms


def genrecal_lr(results: Path) -> float:
    """The LR the transfer experiment chose for GenRecal on validation (its tuning CSV)."""
    rows = list(csv.DictReader((results / "transfer-tuning.csv").open()))
    return float(next(r["lr"] for r in rows if r["arm"] == "genrecal" and r["chosen"] == "True"))


def run(out: Path, jobs: int, results: Path, preset: str = "question-fraction") -> None:
    """The preset's variants into `out` (the transfer experiment's work folder) and `results` (CSVs)."""
    t0, lr = time.perf_counter(), genrecal_lr(results)
    prefix, variants = PRESETS[preset]
    with mp.get_context("spawn").Pool(jobs) as pool:
        (out / "gate-check").mkdir(parents=True, exist_ok=True)  # its CSV again, beside tools/results' one
        chosen = gate(out, pool, out / "gate-check")  # reuses the transfer experiment's teachers
        if chosen is None:
            print("No candidate task passes the gate: nothing to run (see the transfer experiment).")
            return
        task, data, epochs = chosen
        answers = {t: s for (kind, t), s in make_stores(pool, task, data, epochs).items() if kind == "answers"}
        stores = {(v.name, t): answers[t] for v in variants if not v.store for t in TEACHER_SEEDS}
        made = [(v.name, t, {**_store_job(task, f"answers-e{epochs}-t{t}-{v.tag}", task / "teachers" /
                                          f"e{epochs}-t{t}", data["student"], "generate"), "options": v.store})
                for v in variants if v.store for t in TEACHER_SEEDS]
        for (name, t, _), path in zip(made, pool.map(store_job, [j for *_, j in made])):
            stores[(name, t)] = Path(path)
        print(f"stores ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        pairs = [(v, t, s) for v in variants for t in TEACHER_SEEDS for s in STUDENT_SEEDS]
        runs = [_student(task, f"{prefix}-{v.name.replace('=', '')}-lr{lr:g}-t{t}-s{s}", stores[(v.name, t)],
                         "genrecal", s, {"lr": lr, "lr_end": lr / 10, **v.flags}, {"test": data["test"]})
                for v, t, s in pairs]
        done = _students(pool, runs)
    rows = [{"arm": v.name, "lr": lr, "teacher_seed": t, "student_seed": s, "test_accuracy": r["test"],
             "seconds": r["seconds"]} for (v, t, s), r in zip(pairs, done)]
    name = "fraction" if preset == "question-fraction" else preset
    _write_csv(results / f"{name}.csv", rows)
    report(rows, stores, results, _transfer_genrecal(results), name, [v.name for v in variants])
    print(f"({time.perf_counter() - t0:.0f} s)")


def _transfer_genrecal(results: Path) -> dict[tuple[int, int], float]:
    rows = csv.DictReader((results / "transfer.csv").open())
    return {(int(r["teacher_seed"]), int(r["student_seed"])): float(r["test_accuracy"]) for r in rows
            if r["arm"] == "genrecal"}


def store_sizes(path: Path) -> dict[str, float]:
    """A store's bytes on disk, its question features' bytes, and the share of samples that have them."""
    from genrecal_cache.inspection import summary
    from genrecal_cache.store.reader import TeacherStore

    s = summary(TeacherStore(path))
    qf = sum(p["arrays"]["question_features"]["bytes_on_disk"] for p in s["parts"])
    return {"bytes_on_disk": s["bytes_on_disk"], "question_feature_bytes": qf,
            "samples_with_question_features": s["samples_with_question_features"] / s["samples"]}


def analyse(rows: list[dict], arms: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Per-arm statistics and each arm's paired difference to the first of `arms` (default: the registered
    question-fraction arms; two-sided, Holm over the others)."""
    from scipy import stats

    arms = arms or list(ARMS)
    acc: dict[str, dict[tuple[int, int], float]] = {}
    for r in rows:
        acc.setdefault(r["arm"], {})[(int(r["teacher_seed"]), int(r["student_seed"]))] = float(r["test_accuracy"])
    stats_ = [dict(zip(("arm", "n", "mean", "sd", "ci_low", "ci_high"), (a, len(by), *_interval(list(by.values())))))
              for a, by in acc.items()]
    base, keys, comps = arms[0], sorted(acc[arms[0]]), []
    for other in arms[1:]:
        diffs = [acc[other][k] - acc[base][k] for k in keys]
        m, sd, lo, hi = _interval(diffs)
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else float(m == 0)
        comps.append({"comparison": f"{other} - {base}", "mean_diff": m, "sd_diff": sd, "ci_low": lo, "ci_high": hi,
                      "wins": sum(d > 0 for d in diffs), "n": len(diffs), "p": p,
                      "per_pair": " ".join(f"{d:+.4f}" for d in diffs)})
    for c, adj in zip(comps, holm([c["p"] for c in comps])):
        c["p_holm"] = adj
    return stats_, comps


def recommendation(comps: list[dict]) -> str:
    """The registered decision rule, applied."""
    by = {c["comparison"].split(" - ")[0]: c for c in comps}
    reg = by["no-regularizer"]  # no-regularizer - F=1: the regularizer's effect is its negative
    if not (reg["p_holm"] < 0.05 and reg["mean_diff"] < 0):
        return "the regularizer showed no measurable effect here: choose F by the bytes you can afford"
    for f in ("F=0.1", "F=0.25"):
        if by[f]["mean_diff"] >= -0.01 and by[f]["ci_low"] >= -0.03:
            return f"{f}: within the registered margin of F=1 at {f[2:]} of the question features' bytes"
    return "F=1: the smaller fractions lose more than the registered margin"


def report(rows: list[dict], stores: dict, results: Path, transfer: dict[tuple[int, int], float], name: str,
           variants: list[str]) -> None:
    arms, comps = analyse(rows, variants)
    for a in arms:
        a.update(store_sizes(stores[(a["arm"], 0)]))
    _write_csv(results / f"{name}-summary.csv", arms)
    _write_csv(results / f"{name}-paired.csv", comps)
    print("\n| arm | accuracy: mean | sample SD | 95% t-interval | store (teacher seed 0) | question features |"
          "\n|---|---|---|---|---|---|")
    for a in arms:
        print(f"| {a['arm']} | {100 * a['mean']:.1f} | {100 * a['sd']:.1f} | [{100 * a['ci_low']:.1f}, "
              f"{100 * a['ci_high']:.1f}] | {a['bytes_on_disk'] / 2**20:.1f} MiB | "
              f"{a['question_feature_bytes'] / 2**20:.1f} MiB ({a['samples_with_question_features']:.0%} of samples) |")
    print(f"\n| arm − {variants[0]} | mean Δ [95% t-interval] | wins | p | p (Holm) |\n|---|---|---|---|---|")
    for c in comps:
        print(f"| {c['comparison'].split(' - ')[0]} | {100 * c['mean_diff']:+.1f} [{100 * c['ci_low']:+.1f}, "
              f"{100 * c['ci_high']:+.1f}] | {c['wins']}/{c['n']} | {c['p']:.3g} | {c['p_holm']:.3g} |")
    for arm in variants:  # against the transfer experiment's genrecal runs (its fp32 store, the same seeds)
        again = {(int(r["teacher_seed"]), int(r["student_seed"])): float(r["test_accuracy"]) for r in rows
                 if r["arm"] == arm}
        same = sum(again[k] == transfer.get(k) for k in again)
        print(f"{arm} against the transfer experiment's genrecal runs: {same}/{len(again)} equal, mean difference "
              f"{100 * sum(again[k] - transfer[k] for k in again) / len(again):+.2f} points")
    if name == "fraction":
        print(f"recommendation (registered rule): {recommendation(comps)}")
