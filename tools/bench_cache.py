"""Benchmark `cache-teacher` against the bare teacher forward over the same batches, in the same run, and the
backends against each other.

Reports the whole job's wall time (manifest, images, rendering, forward, top-k, store writes and commits), the
bare forward's, their ratio, the part spent rendering, bytes on disk per label token and the compression ratio;
with `--backend hf,vllm` also each backend's tokens/s on the same model and data, and the share of the job's
wall time spent outside the engine (our own code: reading, rendering, transfer, top-k, storage).
Writes CSV. Example: python tools/bench_cache.py --model llava --scale 4 --rows 256 --backend hf,vllm
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_data import write_demo_manifest  # noqa: E402
from tiny_zoo import ZOO_NAMES, build_model  # noqa: E402

from genrecal_cache.cache import CacheConfig, CacheJob  # noqa: E402
from genrecal_cache.dataset import parse_row  # noqa: E402
from genrecal_cache.sources import read_manifest  # noqa: E402
from genrecal_cache.errors import RejectError  # noqa: E402
from genrecal_cache.inspection import summary  # noqa: E402
from genrecal_cache.store import TeacherStore  # noqa: E402
from genrecal_cache.teacher_hf import HFTeacher  # noqa: E402


def bench(model: str, scale: int, rows: int, dtype: str, feature_dtype: str, batch_tokens: int, work: Path,
          question_features: bool, backend: str) -> dict:
    path = build_model(model, work / f"{model}-x{scale}", seed=0, scale=scale) if model in ZOO_NAMES else Path(model)
    manifest = write_demo_manifest(work / "data", n=rows, seed=0, bad_rows=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def cfg(out: Path) -> CacheConfig:
        return CacheConfig(teacher=str(path), manifest=manifest, output=out, dtype=feature_dtype, device=device,
                           batch_tokens=batch_tokens, question_features=question_features, progress=False,
                           backend=backend, max_length=4096, command=["bench_cache"])

    if backend == "vllm":
        return bench_engine(cfg, work, model, scale, device, feature_dtype)
    teacher = HFTeacher(str(path), dtype, device)
    params = sum(p.numel() for p in teacher.model.parameters())

    # The same batches the job forms: render everything, then batch exactly as CacheJob._flush does.
    job = CacheJob(cfg(work / "probe-store"), teacher)
    t0 = time.perf_counter()
    rendered = []
    for row in read_manifest(manifest):
        try:
            rendered.append(job.renderer.render(parse_row(row, manifest.parent)))
        except RejectError:
            pass
    t_render = time.perf_counter() - t0
    batches: list[list] = [[]]
    for r in rendered:
        b = batches[-1]
        longest = max([len(x.input_ids) for x in b] + [len(r.input_ids)])
        if b and ((len(b) + 1) * longest > batch_tokens or not job.renderer.compatible(b[0], r)):
            batches.append([])
        batches[-1].append(r)

    def forward_only() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches:
            teacher.forward(job.renderer, b, question_features)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    forward_only()  # warm-up
    t_forward = min(forward_only() for _ in range(2))
    t_jobs = []
    for i in range(2):
        out = work / f"store-{i}"
        t = time.perf_counter()
        res = CacheJob(cfg(out), teacher).run()
        t_jobs.append(time.perf_counter() - t)
    s = summary(TeacherStore(work / "store-1"))
    return {
        "backend": "hf", "model": model, "scale": scale, "params": params, "device": device, "dtype": dtype,
        "feature_dtype": feature_dtype, "samples": res.samples, "label_tokens": res.label_tokens,
        "tokens": res.tokens, "batches": len(batches),
        "t_forward_s": round(t_forward, 3), "t_render_s": round(t_render, 3), "t_job_s": round(min(t_jobs), 3),
        "job_over_forward": round(min(t_jobs) / t_forward, 3),
        "job_minus_render_over_forward": round((min(t_jobs) - t_render) / t_forward, 3),
        "bytes_per_label_token": round(s["bytes_per_label_token"], 1),
        "compression_ratio": round(s["compression_ratio"], 3),
        **_rates(res, min(t_jobs)),
    }


def _rates(res, t_job: float) -> dict:
    """Tokens/s of the whole job, and the share of its wall time spent outside the teacher's forward."""
    return {"tokens_per_s": round(res.tokens / t_job, 1),
            "outside_engine_share": round(1 - res.forward_seconds / t_job, 3)}


def bench_engine(cfg, work: Path, model: str, scale: int, device: str, feature_dtype: str) -> dict:
    """The vLLM backend's job, twice on one engine (the first run warms it up); its engine time is what
    `VLLMTeacher.forward` spends, vLLM's own pre/post-processing included."""
    from genrecal_cache.teacher import load_teacher

    teacher = load_teacher(cfg(work / "probe"))
    try:
        runs = []
        for i in range(2):
            t = time.perf_counter()
            res = CacheJob(cfg(work / f"vllm-{i}"), teacher).run()
            runs.append((time.perf_counter() - t, res))
    finally:
        teacher.close()
    t_job, res = min(runs, key=lambda r: r[0])
    return {"backend": "vllm", "model": model, "scale": scale, "device": device, "feature_dtype": feature_dtype,
            "samples": res.samples, "label_tokens": res.label_tokens, "tokens": res.tokens,
            "t_job_s": round(t_job, 3), "t_forward_s": round(res.forward_seconds, 3), **_rates(res, t_job)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["llava"], help="zoo names or model directories")
    ap.add_argument("--scale", type=int, nargs="+", default=[4], help="zoo width/depth multipliers")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--dtype", default="float32", help="teacher compute dtype")
    ap.add_argument("--feature-dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--question-features", action="store_true")
    ap.add_argument("--backend", default="hf", help="comma-separated: hf, vllm (vllm needs vLLM installed)")
    ap.add_argument("--out", type=Path, default=Path("bench-cache.csv"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    results = []
    for model in args.model:
        for scale in args.scale:
            for fd in args.feature_dtype:
                for backend in args.backend.split(","):
                    with tempfile.TemporaryDirectory() as tmp:
                        results.append(bench(model, scale, args.rows, args.dtype, fd, args.batch_tokens, Path(tmp),
                                             args.question_features, backend))
                    print(results[-1], flush=True)
    fields = list(dict.fromkeys(k for r in results for k in r))
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
