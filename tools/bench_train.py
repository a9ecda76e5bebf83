"""Benchmark a train-student step (stage 2: student, Recalibrator, regularizer): time split into data wait /
student forward / Recalibrator / loss / backward, tokens/s, and peak memory, with the fused loss and the naive one.
`--memory`: peak memory per component (weights, gradients, optimizer state, activations, teacher head, store batch)
of a full fine-tune, LoRA and gradient checkpointing, each measured from the tensors themselves.

Each configuration runs in a fresh subprocess over the same store and stage-1 Recalibrator. Writes CSV.
`--url s3://bucket/prefix` (or `auto`: a SeaweedFS started here, tools/s3server.py): the same store also uploaded to
the object store, and the fused configuration trained from it too (the `store` column): the data wait there.
Example: python tools/bench_train.py --scale 4 --student-scale 2 --rows 96 --steps 8 --out bench-train.csv
         python tools/bench_train.py --memory --student-scale 4 --out bench-train-memory.csv
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
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_store import object_url  # noqa: E402
from demo_data import write_demo_manifest  # noqa: E402
from tiny_zoo import build_model  # noqa: E402

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache  # noqa: E402
from genrecal_train.config import TrainConfig  # noqa: E402
from genrecal_train.trainer import Trainer  # noqa: E402

PHASES = ("data_wait", "student_forward", "recalibrator", "loss", "backward")
COMPONENTS = ("weights", "grads", "optimizer", "activations", "teacher_head", "store_batch")
MEMORY_MODES = {"full": {}, "full+checkpointing": {"gradient_checkpointing": True}, "lora": {"lora_rank": 16},
                "lora+checkpointing": {"lora_rank": 16, "gradient_checkpointing": True}}


def setup(work: Path, teacher: str, student: str, scale: int, student_scale: int, rows: int,
          url: str | None = None) -> dict:
    """Zoo models, a store with question features (also at `url`), and a stage-1 Recalibrator (one step) to start
    stage 2."""
    t = build_model(teacher, work / f"{teacher}-x{scale}", seed=0, scale=scale)
    s = build_model(student, work / f"{student}-x{student_scale}", seed=1, scale=student_scale)
    manifest = write_demo_manifest(work / "data", n=rows, seed=0, bad_rows=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_cache(CacheConfig(teacher=str(t), manifest=manifest, output=work / "store", question_features=True,
                          device=device, progress=False, command=["bench_train"]))
    remote = f"{url}/bench-train-{os.getpid()}" if url else None
    if remote:  # the same store, uploaded whole (as `aws s3 cp --recursive` would)
        from genrecal_cache.core.locations import Location

        loc = Location.of(remote)
        loc.fs.put(str(work / "store") + "/", loc.path + "/", recursive=True)
    return {"store": str(work / "store"), "student": str(s), "output": str(work / "out"), "device": device,
            "url": remote}


def config(spec: dict, **kw) -> TrainConfig:
    return TrainConfig(store=spec["store"], student=spec["student"], output=Path(spec["output"]),
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
    row = {"impl": spec["impl"], "store": spec["store"].split("://")[0] if "://" in spec["store"] else "local",
           "device": spec["device"], "steps": spec["steps"],
           "step_ms": round(1000 * total / spec["steps"], 1), "teacher_tokens_per_s": round(tokens / total, 1),
           "peak_mib": round(max(peak - base, 0) / 2**20, 1) if cuda else round(peak / 2**20, 1)}
    for p in PHASES:
        row[f"{p}_pct"] = round(100 * t.times.get(p, 0.0) / total, 1)
    return row


def _nbytes(obj: object, seen: set[int]) -> int:
    """Bytes of the distinct tensors and arrays reachable from `obj` (dataclasses, dicts, lists)."""
    if isinstance(obj, torch.Tensor) or hasattr(obj, "__array_interface__"):
        key = obj.untyped_storage().data_ptr() if isinstance(obj, torch.Tensor) else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if isinstance(obj, torch.Tensor) else obj.nbytes
    if is_dataclass(obj):
        return sum(_nbytes(getattr(obj, f.name), seen) for f in fields(obj))
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


class SavedForBackward:
    """Counts the distinct storages autograd saves for backward that are not parameters: the activations (under
    gradient checkpointing only what the checkpoints keep, as torch's own hooks take over inside them)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def measure_memory(spec: dict) -> dict:
    """One stage-2 step of one memory mode (run in its own process), each component from its tensors."""
    cfg = config(spec, stage="2", impl="auto", epochs=1000, log_every=10**6, save_every=10**6, prefetch=False,
                 report_to="none", **MEMORY_MODES[spec["mode"]])
    cuda = spec["device"] == "cuda"
    with Trainer(cfg, 2) as t:
        micro = t.next_micro_batches()
        grads: dict[str, int] = {}
        t.opt.register_step_pre_hook(lambda opt, *_: grads.__setitem__("bytes", sum(
            p.grad.nbytes for g in opt.param_groups for p in g["params"] if p.grad is not None)))
        params = list(t.models.parameters())
        saved = SavedForBackward(params)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            t.train_step(micro)
        head = [t.head.weight, t.head.bias, t.embed]
        row = {"mode": spec["mode"], "device": spec["device"],
               "student_params_m": round(sum(p.numel() for p in t.student.parameters()) / 1e6, 3),
               "trainable_params_m": round(sum(p.numel() for p in params if p.requires_grad) / 1e6, 3),
               "weights": _nbytes(params, set()), "grads": grads.get("bytes", 0),
               "optimizer": _nbytes(list(t.opt.state.values()), set()), "activations": saved.bytes,
               "teacher_head": _nbytes([x for x in head if x is not None], set()), "store_batch": _nbytes(micro, set())}
        row["peak_mib"] = round((torch.cuda.max_memory_allocated() if cuda else
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20, 1)
    for c in COMPONENTS:
        row[c] = round(row[c] / 2**20, 2)  # MiB
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
    ap.add_argument("--memory", action="store_true", help="peak memory per component of full / LoRA / gradient "
                    "checkpointing instead of the loss implementations' time")
    ap.add_argument("--url", default=None, help="also train from the store cached to this object store prefix "
                    "(s3://bucket/prefix; AWS_* variables as for cache-teacher), or 'auto' (a SeaweedFS started here)")
    ap.add_argument("--out", type=Path, default=Path("bench-train.csv"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure_memory(spec) if "mode" in spec else measure(spec)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp, object_url(args.url, Path(tmp)) as url:
        spec = setup(Path(tmp), args.teacher, args.student, args.scale, args.student_scale, args.rows, url)
        spec.update(batch_size=args.batch_size, steps=args.steps)
        Trainer(config(spec, stage="1", max_steps=1), 1).run()
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        runs = ([{"mode": m} for m in MEMORY_MODES] if args.memory else
                [{"impl": i} for i in args.impls or ["auto", "naive"]]
                + ([{"impl": "auto", "store": spec["url"]}] if url else []))
        for run in runs:
            p = subprocess.run([sys.executable, __file__, "--one", json.dumps({**spec, **run})], env=env,
                               capture_output=True, text=True, timeout=1800)
            row = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {
                **run, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
            row.update(teacher=f"{args.teacher}x{args.scale}", student=f"{args.student}x{args.student_scale}")
            rows.append(row)
            print(row, flush=True)
    columns = (["mode", "teacher", "student", "device", "student_params_m", "trainable_params_m",
                *(f"{c}" for c in COMPONENTS), "peak_mib", "error"] if args.memory else
               ["impl", "store", "teacher", "student", "device", "steps", "step_ms", "teacher_tokens_per_s", "peak_mib",
                *(f"{p}_pct" for p in PHASES), "error"])
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in columns} for r in rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
