"""The pre-registered transfer experiment (docs/experiment.md#the-transfer-experiment-pre-registration): does
the Recalibrator add anything over SFT on the teacher's answers, when the teacher answers images it never saw?

Phases, each resumable (every trained student keeps its result.json; a rerun skips what is done):
  gate      teachers trained on the teacher set, measured on the transfer set, against gold-label students;
            the first candidate task that passes for both teacher seeds is used, or nothing runs
  stores    the teacher's answers on the student set, the untrained-teacher control, the gold labels
  tuning    every arm's LR grid (ULD also its four settings) on teacher seed 0 / student seed 0, by validation
  seeds     the chosen settings over the 10 registered seed pairs, scored on the test set
  report    per-arm mean, sample SD and 95% t-interval; GenRecal's paired differences against every arm, wins,
            one- or two-sided paired t-tests with Holm's correction; the verdict; CSVs and one figure
Run: python tools/experiment.py --preset transfer OUT
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digits_demo import EXAMPLES, accuracy, export_manifest, make_store, student_base

CANDIDATES = [(0.0, 0.0, 8), (0.0, 0.0, 16), (0.2, 10.0, 8), (0.2, 10.0, 16), (0.35, 20.0, 8), (0.35, 20.0, 16)]
MAX_TEACHER_ACC, MAX_TOP1, MIN_MARGIN = 0.92, 0.90, 0.05
TEACHER_SET, VALIDATION_SET = 400, 200  # of the 1400 training images, in order; the last 800 are the student set
TEACHER_SEEDS, STUDENT_SEEDS = (0, 1), (0, 1, 2, 3, 4)
LRS = (5e-4, 1e-3, 2e-3)
STEPS = 150  # student optimizer steps per stage
PRIMARY = "genrecal"


@dataclass(frozen=True)
class Arm:
    """One arm: its store ("answers", "random" or "gold"), how it trains ("sft": one 2×STEPS stage, "sft2": two
    STEPS stages with the LR schedule restarted, "genrecal" or "uld": STEPS per stage) and the settings tuned
    beside the LR."""

    name: str
    store: str
    method: str
    settings: tuple[dict[str, Any], ...] = field(default=({},))


ARMS = [
    Arm("sft-answers", "answers", "sft"),
    Arm("sft-answers-sched", "answers", "sft2"),
    Arm("genrecal", "answers", "genrecal"),
    Arm("genrecal-no-kl", "answers", "genrecal", ({"kl_weight": 0.0},)),
    Arm("uld", "answers", "uld", tuple({"uld_weight": w, "uld_align": a} for w in (0.5, 1.0) for a in ("index", "chars"))),
    Arm("control-random-teacher", "random", "genrecal"),
    Arm("sft-gold", "gold", "sft"),
]
# GenRecal against each: (arm, alternative); the primary baseline is the better SFT-on-answers arm.
COMPARISONS = ["sft-answers", "sft-answers-sched", "genrecal-no-kl", "uld", "control-random-teacher", "sft-gold"]


def _tag(d: dict[str, Any]) -> str:
    return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(d.items())) or "default"


# ---------------------------------------------------------------------------------------------------------- jobs
def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _train(out: Path, store: Path, student: Path, method: str, steps: int, seed: int, flags: dict) -> Path:
    """One train-student run (the demo's config file under the arm's options); its final student."""
    from genrecal_cache.core.config import config_from
    from genrecal_train.config import TrainConfig
    from genrecal_train.trainer import train

    final = out / "stage3" / "final" / "student"
    if not final.exists():
        shutil.rmtree(out, ignore_errors=True)
        cfg = config_from(TrainConfig, EXAMPLES / "train-student.yaml", store=store, student=str(student),
                          output=out, method=method, max_steps=steps, seed=seed, heldout_fraction=0.0,
                          progress=False, command=["experiment"], **flags)
        train(cfg)
    return final


def student_job(job: dict) -> dict:
    """Train one student (unless its run is done) and score it on the splits asked for; result.json keeps both."""
    _one_thread()
    t0 = time.perf_counter()
    run, store, method, seed, flags = Path(job["run"]), Path(job["store"]), job["method"], job["seed"], job["flags"]
    base = student_base(Path(job["work"]), seed)
    if method == "sft2":  # GenRecal's schedule for SFT: two stages, the warm-up and decay restarted
        first = _train(run / "first", store, base, "sft", STEPS, seed, flags)
        final = _train(run / "second", store, first, "sft", STEPS, seed, flags)
    else:
        final = _train(run, store, base, method, 2 * STEPS if method == "sft" else STEPS, seed, flags)
    path = run / "result.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    for split, manifest in job["score"].items():
        if split not in res:
            res[split] = accuracy(final, Path(manifest))
    res.setdefault("seconds", round(time.perf_counter() - t0, 1))
    path.write_text(json.dumps(res))
    return {**job, **res}


def teacher_job(job: dict) -> dict:
    """Train one teacher on the teacher set (seeded, deterministic), then measure it on the transfer set: greedy
    accuracy, and the mean top-1 probability and entropy of its next-token distribution at the first answer
    position; its test accuracy beside (a reference, not a gate figure)."""
    _one_thread()
    import torch
    from tiny_zoo import build_model
    from train_teacher import train_sft

    out, stats = Path(job["out"]), Path(job["out"]) / "transfer.json"
    if not stats.exists():
        shutil.rmtree(out, ignore_errors=True)
        build_model("llava", out, seed=job["seed"], scale=2)
        torch.use_deterministic_algorithms(True)
        train_sft(out, Path(job["manifest"]), job["epochs"], 1e-3, 16, job["seed"], progress=False)
        top1, entropy = first_answer_distribution(out, Path(job["transfer"]))
        stats.write_text(json.dumps({"transfer_accuracy": accuracy(out, Path(job["transfer"])), "top1": top1,
                                     "entropy": entropy, "test_accuracy": accuracy(out, Path(job["test"]))}))
    return {**job, **json.loads(stats.read_text())}


def first_answer_distribution(model_dir: Path, manifest: Path) -> tuple[float, float]:
    """Mean top-1 probability and mean entropy (nats) of the model's distribution over the first answer token of
    each row, given its image and question."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText

    from genrecal_cache.core.models import load_processor
    from genrecal_cache.data.render import Renderer
    from genrecal_cache.data.rows import parse_row
    from genrecal_cache.data.sources import read_manifest

    renderer = Renderer(load_processor(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    top1, entropy = [], []
    with torch.no_grad():
        for row in read_manifest(manifest):
            r = renderer.render(parse_row(row, manifest.parent))
            first = int(np.flatnonzero(r.label_mask)[0])  # label_mask[p]: token p+1 is an answer token
            logp = model(**renderer.collate([r])).logits[0, first].double().log_softmax(-1)  # (V,)
            top1.append(logp.max().exp().item())
            entropy.append(-(logp.exp() * logp).sum().item())
    return statistics.mean(top1), statistics.mean(entropy)


def untrained_teacher(path: Path, seed: int) -> Path:
    from tiny_zoo import build_model

    if not (path / "config.json").exists():
        build_model("llava", path, seed=seed, scale=2)
    return path


def store_job(job: dict) -> str:
    _one_thread()
    return str(make_store(Path(job["work"]), job["name"], Path(job["teacher"]), Path(job["manifest"]),
                          job["answers"], render_workers=0,  # a pool's worker starts no processes
                          **job.get("options", {})))


# ---------------------------------------------------------------------------------------------------------- phases
def split_data(task: Path, noise: float, rotate: float) -> dict[str, Path]:
    """The registered split: test (397), teacher set (400), validation (200), student set (800); transfer =
    validation + student set."""
    from digits_vqa import write_digits

    d = task / "data"
    files = {k: d / f"{k}.jsonl" for k in ("test", "teacher", "validation", "student", "transfer")}
    if not files["transfer"].exists():
        write_digits(d, gold=TEACHER_SET, seed=0, noise=noise, rotate=rotate)
        rows = (d / "train.jsonl").read_text().splitlines(keepends=True)
        a, b = TEACHER_SET, TEACHER_SET + VALIDATION_SET
        parts = {"test": (d / "heldout.jsonl").read_text().splitlines(keepends=True), "teacher": rows[:a],
                 "validation": rows[a:b], "student": rows[b:], "transfer": rows[a:]}
        for k, part in parts.items():
            files[k].write_text("".join(part))
    return files


def gate(out: Path, pool: Any, results: Path) -> tuple[Path, dict[str, Path], int] | None:
    """The first candidate task that passes for both teacher seeds: (task folder, data, epochs), or None."""
    rows = []
    chosen = None
    for noise, rotate, epochs in CANDIDATES:
        task = out / f"task-noise{noise:g}-rotate{rotate:g}"
        data = split_data(task, noise, rotate)
        jobs = [{"out": str(task / "teachers" / f"e{epochs}-t{t}"), "seed": t, "epochs": epochs,
                 "manifest": str(data["teacher"]), "transfer": str(data["transfer"]), "test": str(data["test"])}
                for t in TEACHER_SEEDS]
        teachers = pool.map(teacher_job, jobs)
        for t in teachers:
            print(f"  noise {noise:g} rotate {rotate:g} epochs {epochs} teacher seed {t['seed']}: transfer "
                  f"accuracy {t['transfer_accuracy']:.1%}, top-1 {t['top1']:.3f}, entropy {t['entropy']:.3f}",
                  flush=True)
        sure = all(t["transfer_accuracy"] <= MAX_TEACHER_ACC and t["top1"] <= MAX_TOP1 for t in teachers)
        gold = None
        if sure:  # only then can the candidate pass; the gold-label students decide
            teacher = untrained_teacher(task / "teachers" / "random-t0", 0)  # SFT reads only answers and images
            store = Path(pool.apply(store_job, (_store_job(task, "gold-teacher-set", teacher, data["teacher"],
                                                           "dataset"),)))
            students = _students(pool, [_student(task, f"gate-sft-gold-lr{lr:g}", store, "sft", 0,
                                                 {"lr": lr, "lr_end": lr / 10}, {"transfer": data["transfer"]})
                                        for lr in LRS])
            gold = max(s["transfer"] for s in students)
            print(f"  best gold-label student (SFT on the teacher set): transfer accuracy {gold:.1%}", flush=True)
        passed = gold is not None and all(t["transfer_accuracy"] >= gold + MIN_MARGIN for t in teachers)
        rows += [{"noise": noise, "rotate": rotate, "epochs": epochs, "teacher_seed": t["seed"],
                  "transfer_accuracy": t["transfer_accuracy"], "top1": t["top1"], "entropy": t["entropy"],
                  "test_accuracy": t["test_accuracy"], "best_gold_student": gold, "passed": passed}
                 for t in teachers]
        if passed:
            chosen = (task, data, epochs)
            break
    _write_csv(results / "transfer-gate.csv", rows)
    return chosen


def _student(work: Path, name: str, store: Path, method: str, seed: int, flags: dict,
             score: dict[str, Path]) -> dict:
    return {"work": str(work), "run": str(work / "runs" / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)),
            "store": str(store), "method": method, "seed": seed, "flags": flags,
            "score": {k: str(v) for k, v in score.items()}}


def _students(pool: Any, jobs: list[dict]) -> list[dict]:
    """Run the jobs (each run folder once, however many jobs name it), results in the jobs' order."""
    unique = list({j["run"]: j for j in jobs}.values())
    done = {r["run"]: r for r in pool.imap_unordered(student_job, unique)}
    return [{**done[j["run"]], **j} for j in jobs]


def _store_job(work: Path, name: str, teacher: Path, manifest: Path, answers: str) -> dict:
    return {"work": str(work), "name": name, "teacher": str(teacher), "manifest": str(manifest), "answers": answers}


def make_stores(pool: Any, task: Path, data: dict[str, Path], epochs: int) -> dict[tuple[str, int], Path]:
    """(store kind, teacher seed) -> store: the teacher's answers on the student set, the same answers through
    the untrained teacher of that seed, and the student set's gold labels (SFT reads only the answers and
    images, so one gold store serves both teacher seeds)."""
    def job(name: str, teacher: Path, manifest: Path, answers: str) -> dict:
        return _store_job(task, name, teacher, manifest, answers)

    for t in TEACHER_SEEDS:
        untrained_teacher(task / "teachers" / f"random-t{t}", t)
    first = [job(f"answers-e{epochs}-t{t}", task / "teachers" / f"e{epochs}-t{t}", data["student"], "generate")
             for t in TEACHER_SEEDS] + [job("gold-student-set", task / "teachers" / "random-t0", data["student"],
                                            "dataset")]
    made = [Path(p) for p in pool.map(store_job, first)]
    stores = {("gold", t): made[-1] for t in TEACHER_SEEDS}
    answered = [export_manifest(made[i], task / "stores" / f"answers-e{epochs}-t{t}.jsonl")
                for i, t in enumerate(TEACHER_SEEDS)]
    randoms = pool.map(store_job, [job(f"random-e{epochs}-t{t}", task / "teachers" / f"random-t{t}", answered[i],
                                       "dataset") for i, t in enumerate(TEACHER_SEEDS)])
    for i, t in enumerate(TEACHER_SEEDS):
        stores[("answers", t)], stores[("random", t)] = made[i], Path(randoms[i])
    return stores


def _run_name(arm: Arm, lr: float, setting: dict, t: int, s: int) -> str:
    teacher = "" if arm.store == "gold" else f"-t{t}"  # the gold arm does not depend on the teacher
    return f"{arm.name}-lr{lr:g}-{_tag(setting)}{teacher}-s{s}"


def tune(pool: Any, task: Path, data: dict[str, Path], stores: dict) -> tuple[dict, list[dict]]:
    """Each arm's (LR, setting) with the best validation accuracy at teacher seed 0 / student seed 0; ties go to
    the smaller LR, then the setting listed first."""
    grid = [(arm, lr, setting) for arm in ARMS for lr in LRS for setting in arm.settings]
    jobs = [_student(task, _run_name(arm, lr, setting, 0, 0), stores[(arm.store, 0)], arm.method, 0,
                     {"lr": lr, "lr_end": lr / 10, **setting}, {"validation": data["validation"]})
            for arm, lr, setting in grid]
    results = _students(pool, jobs)
    chosen, rows = {}, []
    for (arm, lr, setting), res in zip(grid, results):
        if arm.name not in chosen or res["validation"] > chosen[arm.name][2]:
            chosen[arm.name] = (lr, setting, res["validation"])
        rows.append({"arm": arm.name, "lr": lr, "setting": _tag(setting), "validation_accuracy": res["validation"]})
    for r in rows:
        lr, setting, _ = chosen[r["arm"]]
        r["chosen"] = r["lr"] == lr and r["setting"] == _tag(setting)
    print("chosen on validation: " + "; ".join(f"{a} lr {lr:g} {_tag(s)} ({v:.1%})"
                                              for a, (lr, s, v) in chosen.items()), flush=True)
    return {a: (lr, s) for a, (lr, s, _) in chosen.items()}, rows


def run(out: Path, jobs: int, results: Path) -> None:
    """The whole registered experiment into `out` (work) and `results` (CSVs); see the module's docstring."""
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs) as pool:
        chosen = gate(out, pool, results)
        if chosen is None:
            print("No candidate task passes the gate (transfer-gate.csv): as registered, no student runs.")
            return
        task, data, epochs = chosen
        print(f"gate passed: {task.name}, teachers trained {epochs} epochs ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        stores = make_stores(pool, task, data, epochs)
        settings, tuning = tune(pool, task, data, stores)
        _write_csv(results / "transfer-tuning.csv", tuning)
        pairs = [(arm, t, s) for arm in ARMS for t in TEACHER_SEEDS for s in STUDENT_SEEDS]
        runs = [_student(task, _run_name(arm, *settings[arm.name], t, s), stores[(arm.store, t)], arm.method, s,
                         {"lr": settings[arm.name][0], "lr_end": settings[arm.name][0] / 10, **settings[arm.name][1]},
                         {"test": data["test"]}) for arm, t, s in pairs]
        done = _students(pool, runs)
    rows = [{"arm": arm.name, "lr": settings[arm.name][0], "setting": _tag(settings[arm.name][1]),
             "teacher_seed": t, "student_seed": s, "test_accuracy": r["test"], "seconds": r["seconds"]}
            for (arm, t, s), r in zip(pairs, done)]
    _write_csv(results / "transfer.csv", rows)
    report(rows, results, Path(__file__).resolve().parents[1] / "docs" / "transfer-paired.png")
    print(f"({time.perf_counter() - t0:.0f} s)")


# ---------------------------------------------------------------------------------------------------------- report
def _interval(xs: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample SD and the 95% t-interval."""
    from scipy import stats

    m, sd = statistics.mean(xs), statistics.stdev(xs)
    half = stats.t.ppf(0.975, len(xs) - 1) * sd / len(xs) ** 0.5
    return m, sd, m - half, m + half


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(ps)), key=ps.__getitem__)
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def analyse(rows: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """Per-arm statistics, GenRecal's paired comparisons and the registered verdict."""
    from scipy import stats

    acc: dict[str, dict[tuple[int, int], float]] = {}
    for r in rows:
        acc.setdefault(r["arm"], {})[(int(r["teacher_seed"]), int(r["student_seed"]))] = float(r["test_accuracy"])
    arms = []
    for name, by in acc.items():
        m, sd, lo, hi = _interval(list(by.values()))
        arms.append({"arm": name, "n": len(by), "mean": m, "sd": sd, "ci_low": lo, "ci_high": hi})
    means = {a["arm"]: a["mean"] for a in arms}
    baseline = max(("sft-answers", "sft-answers-sched"), key=means.__getitem__)
    pairs = sorted(acc[PRIMARY])
    comps = []
    for other in COMPARISONS:
        diffs = [acc[PRIMARY][p] - acc[other][p] for p in pairs]
        role = "primary" if other == baseline else "secondary" if other == "genrecal-no-kl" else "other"
        alternative = "two-sided" if role == "other" else "greater"
        m, sd, lo, hi = _interval(diffs)
        if sd > 0:
            p = float(stats.ttest_1samp(diffs, 0.0, alternative=alternative).pvalue)
        else:  # every pair differs by the same amount (often 0): no spread to test against
            p = 1.0 if (m <= 0 if alternative == "greater" else m == 0) else 0.0
        comps.append({"comparison": f"{PRIMARY} - {other}", "role": role, "alternative": alternative,
                      "mean_diff": m, "sd_diff": sd, "ci_low": lo, "ci_high": hi,
                      "wins": sum(d > 0 for d in diffs), "n": len(diffs), "p": p,
                      "per_pair": " ".join(f"{d:+.4f}" for d in diffs)})
    for c, adj in zip(comps, holm([c["p"] for c in comps])):
        c["p_holm"] = adj
    prim = next(c for c in comps if c["role"] == "primary")
    sec = next(c for c in comps if c["role"] == "secondary")
    verdict = {"baseline": baseline,
               "primary_met": prim["mean_diff"] >= 0.02 and prim["wins"] >= 8 and prim["p"] < 0.05,
               "secondary_met": sec["mean_diff"] >= 0.01 and sec["p"] < 0.05}
    return arms, comps, verdict


def report(rows: list[dict], results: Path, figure: Path) -> None:
    arms, comps, verdict = analyse(rows)
    _write_csv(results / "transfer-summary.csv", arms)
    _write_csv(results / "transfer-paired.csv", [{k: v for k, v in c.items()} for c in comps])
    print("\n| arm | accuracy: mean | sample SD | 95% t-interval |\n|---|---|---|---|")
    for a in arms:
        print(f"| {a['arm']} | {100 * a['mean']:.1f} | {100 * a['sd']:.1f} | "
              f"[{100 * a['ci_low']:.1f}, {100 * a['ci_high']:.1f}] |")
    print("\n| GenRecal − | role | mean Δ [95% t-interval] | wins | p | p (Holm) |\n|---|---|---|---|---|---|")
    for c in comps:
        print(f"| {c['comparison'].split(' - ')[1]} | {c['role']} ({c['alternative']}) | {100 * c['mean_diff']:+.1f} "
              f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] | {c['wins']}/{c['n']} | {c['p']:.3g} | "
              f"{c['p_holm']:.3g} |")
    print(f"\nprimary (GenRecal − {verdict['baseline']}): "
          f"{'met' if verdict['primary_met'] else 'not met: no contribution of the Recalibrator detected'}; "
          f"secondary (GenRecal − no KL): {'met' if verdict['secondary_met'] else 'not met'}")
    plot(comps, figure)


def plot(comps: list[dict], path: Path) -> None:
    """One figure: GenRecal's per-seed-pair differences against each arm, with the mean and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, c in enumerate(comps):
        diffs = [100 * float(d) for d in c["per_pair"].split()]
        ax.scatter([i + (j - 4.5) * 0.03 for j in range(len(diffs))], diffs, s=14, alpha=0.7)
        ax.errorbar(i + 0.25, 100 * c["mean_diff"], yerr=[[100 * (c["mean_diff"] - c["ci_low"])],
                                                          [100 * (c["ci_high"] - c["mean_diff"])]],
                    fmt="D", color="black", capsize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(comps)), [c["comparison"].split(" - ")[1] + ("\n(primary)" if c["role"] == "primary"
                                                                        else "") for c in comps], fontsize=8)
    ax.set_ylabel("GenRecal − arm (points)")
    ax.set_title("Paired differences per seed pair (dots), mean and 95% t-interval (diamond)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
