"""Benchmark a train-student step (stage 2: student, Recalibrator, regularizer): time split into data wait /
student forward / Recalibrator / loss / backward, tokens/s, and peak memory, with the fused loss and the naive one.

Each loss implementation runs in a fresh subprocess over the same store and stage-1 Recalibrator. Writes CSV.
Example: python tools/bench_train.py --scale 4 --student-scale 2 --rows 96 --steps 8 --out bench-train.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from demo_data import write_demo_manifest  # noqa: E402
from tiny_zoo import build_model  # noqa: E402

from genrecal_cache.cache import CacheConfig, run_cache  # noqa: E402
from genrecal_train.trainer import TrainConfig, Trainer  # noqa: E402

PHASES = ("data_wait", "student_forward", "recalibrator", "loss", "backward")


def setup(work: Path, teacher: str, student: str, scale: int, student_scale: int, rows: int) -> dict:
    """Zoo models, a store with question features, and a stage-1 Recalibrator (one step) to start stage 2."""
    t = build_model(teacher, work / f"{teacher}-x{scale}", seed=0, scale=scale)
    s = build_model(student, work / f"{student}-x{student_scale}", seed=1, scale=student_scale)
    manifest = write_demo_manifest(work / "data", n=rows, seed=0, bad_rows=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_cache(CacheConfig(teacher=str(t), manifest=manifest, output=work / "store", question_features=True,
                          device=device, progress=False, command=["bench_train"]))
    return {"store": str(work / "store"), "student": str(s), "output": str(work / "out"), "device": device}


def config(spec: dict, **kw) -> TrainConfig:
    return TrainConfig(store=Path(spec["store"]), student=spec["student"], output=Path(spec["output"]),
                       batch_size=spec["batch_size"], heldout_fraction=0.0, reliance_every=0, progress=False,
                       device=spec["device"], command=["bench_train"], **kw)


def measure(spec: dict) -> dict:
    """Time `steps` stage-2 steps after one warm-up step (run in its own process)."""
    cfg = config(spec, stage="2", impl=spec["impl"], epochs=1000, log_every=10**6, save_every=10**6,
                 prefetch=spec.get("prefetch", True))
    with Trainer(cfg, 2) as t:
        return _measure(spec, t)


def _measure(spec: dict, t: Trainer) -> dict:
    t.train_step(t.next_micro_batches())  # warm-up (Triton compilation, allocator)
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t.times, tokens = {}, 0
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        with t.timer("data_wait"):
            micro = t.next_micro_batches()
        tokens += t.train_step(micro)["tokens"]
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row = {"impl": spec["impl"], "device": spec["device"], "steps": spec["steps"],
           "step_ms": round(1000 * total / spec["steps"], 1), "teacher_tokens_per_s": round(tokens / total, 1),
           "peak_mib": round(max(peak - base, 0) / 2**20, 1) if cuda else round(peak / 2**20, 1)}
    for p in PHASES:
        row[f"{p}_pct"] = round(100 * t.times.get(p, 0.0) / total, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="qwen2vl")
    ap.add_argument("--student", default="idefics3")
    ap.add_argument("--scale", type=int, default=4, help="teacher zoo width/depth multiplier")
    ap.add_argument("--student-scale", type=int, default=2)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--impls", nargs="+", default=None, help="default: auto naive")
    ap.add_argument("--out", type=Path, default=Path("bench-train.csv"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = setup(Path(tmp), args.teacher, args.student, args.scale, args.student_scale, args.rows)
        spec.update(batch_size=args.batch_size, steps=args.steps)
        Trainer(config(spec, stage="1", max_steps=1), 1).run()
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        for impl in args.impls or ["auto", "naive"]:
            p = subprocess.run([sys.executable, __file__, "--one", json.dumps({**spec, "impl": impl})], env=env,
                               capture_output=True, text=True, timeout=1800)
            row = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {
                "impl": impl, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
            row.update(teacher=f"{args.teacher}x{args.scale}", student=f"{args.student}x{args.student_scale}")
            rows.append(row)
            print(row, flush=True)
    fields = ["impl", "teacher", "student", "device", "steps", "step_ms", "teacher_tokens_per_s", "peak_mib",
              *(f"{p}_pct" for p in PHASES), "error"]
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in fields} for r in rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
