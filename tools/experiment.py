"""The demo's comparison over seeds, training-set sizes, arms and controls (issue: the miniature of the paper's
experiment). Each (size, arm, seed) trains one student and scores it on the held-out images; rows go to a CSV
as they finish (re-running skips the done ones), then a summary: mean ± sample SD per arm and the per-seed delta
against the fair baseline (SFT on the same teacher answers).

Arms: SFT on the gold labels; SFT on the teacher's answers; GenRecal with the paper's defaults (answer inputs
= teacher features, regularizer, fresh positions, T=1) and one change each (embeddings, no regularizer, no
fresh positions, T=2, L_ar only: no KL); the untrained-teacher control (the same answers, features and head of
a random teacher); an exact repeat of the default arm (run-to-run noise); and the cross-tokenizer baseline ULD
(Universal Logit Distillation) from the same store, with the teacher's full distribution or its stored top-k.
Run: python tools/experiment.py exp-out --seeds 5 --sizes 300 1400 --jobs 2
The pre-registered transfer experiment (a teacher that never saw the students' images; docs/experiment.md):
     python tools/experiment.py --preset transfer exp-transfer   (tools/transfer_experiment.py)
Its --question-features-fraction and fp8 follow-ups, in the same work folder (tools/variant_experiment.py):
     python tools/experiment.py --preset question-fraction exp-transfer   (or --preset fp8)
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

from digits_demo import (
    Arm,
    accuracy,
    export_manifest,
    make_data,
    make_store,
    make_teacher,
    reliance,
    train_student,
)

ARMS = [
    Arm("sft-gold", "gold", "sft"),
    Arm("sft-teacher", "teacher", "sft"),
    Arm("genrecal", "teacher", "genrecal"),
    Arm("genrecal-embeddings", "teacher", "genrecal", {"answer_inputs": "embeddings"}),
    Arm("genrecal-no-reg", "teacher", "genrecal", {"regularizer": False}),
    Arm("genrecal-no-new-pos", "teacher", "genrecal", {"new_positions": False}),
    Arm("genrecal-T2", "teacher", "genrecal", {"temperature": 2.0}),
    Arm("genrecal-ar-only", "teacher", "genrecal", {"kl_weight": 0.0}),
    Arm("control-random-teacher", "random", "genrecal"),
    Arm("genrecal-repeat", "teacher", "genrecal"),
    Arm("uld", "teacher", "uld"),
    Arm("uld-topk", "teacher", "uld", {"uld_source": "topk"}),
]
FIELDS = ["size", "arm", "seed", "accuracy", "s1_own", "s1_shuffled", "s2_own", "s2_shuffled", "seconds"]


def _job(args: tuple) -> dict:
    work, stores, heldout, size, arm, seed, steps = args
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tag = f"{size}-{arm.name}-seed{seed}"
    final = train_student(work, stores[arm.store], arm, seed, steps, tag)
    return {"size": size, "arm": arm.name, "seed": seed, "accuracy": accuracy(final, heldout), **reliance(final),
            "seconds": round(time.perf_counter() - t0, 1)}


def _sd(xs: list[float]) -> float:
    """The sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _paired(accs: dict[int, float], base: dict[int, float]) -> dict:
    deltas = [accs[s] - base[s] for s in sorted(accs) if s in base]
    return {"mean": statistics.mean(deltas) if deltas else None, "std": _sd(deltas) if deltas else None,
            "better": sum(d > 0 for d in deltas), "n": len(deltas), "per_seed": " ".join(f"{d:+.3f}" for d in deltas)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sample SD per (size, arm), and the per-seed deltas against SFT on the teacher's answers (the fair
    baseline) and against GenRecal's defaults."""
    out = []
    for size in sorted({int(r["size"]) for r in rows}):
        by = {}
        for r in rows:
            if int(r["size"]) == size:
                by.setdefault(r["arm"], {})[int(r["seed"])] = float(r["accuracy"])
        for arm in [a.name for a in ARMS if a.name in by]:
            accs = by[arm]
            vs_sft, vs_genrecal = _paired(accs, by.get("sft-teacher", {})), _paired(accs, by.get("genrecal", {}))
            rel = [r for r in rows if int(r["size"]) == size and r["arm"] == arm and r.get("s1_own") not in ("", None)]
            out.append({
                "size": size, "arm": arm, "seeds": len(accs),
                "mean": statistics.mean(accs.values()), "std": _sd(list(accs.values())),
                "delta_vs_sft_teacher": vs_sft["mean"], "delta_std": vs_sft["std"],
                "seeds_better": vs_sft["better"], "per_seed_delta": vs_sft["per_seed"],
                "delta_vs_genrecal": vs_genrecal["mean"], "delta_vs_genrecal_std": vs_genrecal["std"],
                "seeds_better_than_genrecal": vs_genrecal["better"],
                "reliance_s1_own": statistics.mean(float(r["s1_own"]) for r in rel) if rel else None,
                "reliance_s1_shuffled": statistics.mean(float(r["s1_shuffled"]) for r in rel) if rel else None,
            })
    return out


def table(summary: list[dict]) -> str:
    """The README's table: accuracy, and the paired differences against the fair baseline and GenRecal."""
    def delta(s: dict, key: str, std: str, better: str) -> str:
        if s[key] is None:
            return ""
        return f"{100 * s[key]:+.1f} ± {100 * s[std]:.1f} ({s[better]}/{s['seeds']})"

    lines = ["| size | arm | seeds | accuracy | Δ vs SFT on teacher answers (seeds better) | Δ vs GenRecal (seeds "
             "better) | reliance own / shuffled |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        r = "" if s["reliance_s1_own"] is None else f"{s['reliance_s1_own']:.2f} / {s['reliance_s1_shuffled']:.2f}"
        lines.append(f"| {s['size']} | {s['arm']} | {s['seeds']} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | "
                     f"{delta(s, 'delta_vs_sft_teacher', 'delta_std', 'seeds_better')} | "
                     f"{delta(s, 'delta_vs_genrecal', 'delta_vs_genrecal_std', 'seeds_better_than_genrecal')} | {r} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 1400], help="training images the teacher answers")
    ap.add_argument("--gold", type=int, default=100)
    ap.add_argument("--steps", type=int, default=150, help="student optimizer steps per stage")
    ap.add_argument("--arms", nargs="*", default=None, help="only these arms (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="students trained at once (one core each)")
    ap.add_argument("--noise", type=float, default=0.0, help="image noise (a harder task, a less sure teacher)")
    ap.add_argument("--rotate", type=float, default=0.0, help="random rotation of the images, in degrees")
    ap.add_argument("--csv", type=Path, default=Path("tools/results/experiment.csv"),
                    help="rows (--preset transfer: its CSVs go to this file's folder)")
    ap.add_argument("--preset", choices=["transfer", "question-fraction", "fp8"], default=None,
                    help="transfer: the pre-registered transfer experiment, all of it (its own seeds and arms); "
                         "question-fraction: the registered --question-features-fraction arms in its setting; fp8: "
                         "GenRecal from a bf16 and an fp8 store there (for both, OUT: the transfer experiment's work "
                         "folder, reused)")
    ap.add_argument("--summary-only", action="store_true",
                    help="only write --csv's summary again from its rows (nothing is trained)")
    args = ap.parse_args()
    if args.preset == "transfer":
        import transfer_experiment

        return transfer_experiment.run(args.out, args.jobs, args.csv.parent)
    if args.preset in ("question-fraction", "fp8"):
        import variant_experiment

        return variant_experiment.run(args.out, args.jobs, args.csv.parent, args.preset)
    if args.summary_only:
        return write_summary(args.csv)
    work = args.out
    data = make_data(work, args.gold, noise=args.noise, rotate=args.rotate)
    teacher, acc = make_teacher(work, data)
    random_teacher, racc = make_teacher(work, data, "random")
    print(f"teacher held-out accuracy {acc:.1%}; untrained teacher {racc:.1%}", flush=True)
    stores = {}
    for size in args.sizes:
        t = make_store(work, f"teacher-{size}", teacher, data["train"], "generate", size)
        answered = export_manifest(t, work / "stores" / f"answers-{size}.jsonl")
        stores[size] = {"gold": make_store(work, "gold", teacher, data["gold"], "dataset"), "teacher": t,
                        "random": make_store(work, f"random-{size}", random_teacher, answered, "dataset")}
    arms = [a for a in ARMS if args.arms is None or a.name in args.arms]
    done = set()
    if args.csv.exists():
        done = {(int(r["size"]), r["arm"], int(r["seed"])) for r in csv.DictReader(args.csv.open())}
    jobs = [(work, stores[size], data["heldout"], size, arm, seed, args.steps)
            for seed in range(args.seeds) for size in args.sizes for arm in arms if (size, arm.name, seed) not in done]
    print(f"{len(jobs)} students to train ({len(done)} done before)", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f, mp.get_context("spawn").Pool(args.jobs) as pool:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for row in pool.imap_unordered(_job, jobs):
            w.writerow(row)
            f.flush()
            print(row, flush=True)
    write_summary(args.csv)


def write_summary(rows_csv: Path) -> None:
    """`summarise` the rows of `rows_csv` into `<stem>-summary.csv` beside it, and print the table."""
    summary = summarise(list(csv.DictReader(rows_csv.open())))
    path = rows_csv.with_name(rows_csv.stem + "-summary.csv")
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    print("\n" + table(summary))
    print(f"wrote {rows_csv} and {path}")


if __name__ == "__main__":
    main()
