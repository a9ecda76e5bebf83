"""Benchmark `cache-teacher` against the bare teacher forward over the same batches, in the same run, and the
backends against each other.

Reports the whole job's wall time (manifest, images, rendering, forward, top-k, store writes and commits), the
bare forward's, their ratio, the part spent rendering, bytes on disk per label token and the compression ratio;
with `--backend hf,vllm` also each backend's tokens/s on the same model and data, and the share of the job's
wall time spent outside the engine (our own code: reading, rendering, transfer, top-k, storage).
Writes CSV. Example: python tools/bench_cache.py --model llava --scale 4 --rows 256 --backend hf,vllm

`--stub-engine-ms MS` replaces the engine by a stand-in of fixed cost per sample (it sleeps, as a GPU engine
leaves the CPU free, and returns random features of the teacher's width), so what is measured is everything
else: reading, decoding images, rendering, top-k and storage, on `--turns K`-turn conversations with one
`--image-size WxH` image, with `--render-workers` (default: the job's default, and 0 for comparison). Example:
    python tools/bench_cache.py --model qwen2vl --stub-engine-ms 25 --turns 6 --image-size 640x480 --rows 200
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

from genrecal_cache.core.errors import RejectError  # noqa: E402
from genrecal_cache.data.rows import parse_row  # noqa: E402
from genrecal_cache.data.sources import read_manifest  # noqa: E402
from genrecal_cache.inspection import summary  # noqa: E402
from genrecal_cache.job.cache_job import CacheJob  # noqa: E402
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.store.reader import TeacherStore  # noqa: E402
from genrecal_cache.teacher.hf import HFTeacher  # noqa: E402


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


class StubEngine:
    """A teacher whose forward costs `ms` per sample of sleep (the engine's time on a GPU, CPU left free) and
    returns random features of the real teacher's width; everything else is the real teacher's."""

    def __init__(self, teacher, ms: float):
        self.teacher, self.ms = teacher, ms

    def __getattr__(self, name: str):
        if name in ("teacher", "ms"):
            raise AttributeError(name)
        return getattr(self.teacher, name)

    def forward(self, renderer, batch, question, images=None, layers=()):
        from genrecal_cache.teacher.base import TeacherOutput

        time.sleep(self.ms / 1000 * len(batch))
        d = self.teacher.head.weight.shape[1]
        return [TeacherOutput(features=torch.randn(int(r.label_mask.sum()), d),
                              question=torch.randn(int((~r.label_mask).sum()), d) if question else None)
                for r in batch]


def write_turns_manifest(out: Path, rows: int, turns: int, image_size: tuple[int, int] | None, seed: int = 0
                         ) -> Path:
    """`rows` conversations of `turns` question/answer pairs, the first question with one photo-like JPEG
    (smooth gradients plus noise) of `image_size`, or none."""
    import json
    import random

    import numpy as np
    from PIL import Image

    rng, out = random.Random(seed), out / "turns"
    (out / "images").mkdir(parents=True, exist_ok=True)
    words = "what is shown here the digit image left right top bottom colour count how many one two three".split()
    lines = []
    for i in range(rows):
        msgs = []
        for t in range(turns):
            q = " ".join(rng.choices(words, k=rng.randint(6, 16))) + "?"
            a = " ".join(rng.choices(words, k=rng.randint(10, 40))) + "."
            content = [{"type": "text", "text": q}]
            if t == 0 and image_size:
                content.insert(0, {"type": "image"})
            msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        row = {"id": f"r{i}", "messages": msgs}
        if image_size:
            w, h = image_size
            g = np.random.default_rng(seed + i)
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
            pixels = np.clip(base + g.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(out / "images" / f"{i}.jpg", quality=90)
            row["images"] = [f"images/{i}.jpg"]
        lines.append(json.dumps(row))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out / "manifest.jsonl"


def bench_stub(model: str, scale: int, rows: int, ms: float, turns: int, image_size: tuple[int, int] | None,
               workers: list[int | None], feature_dtype: str, batch_tokens: int, work: Path,
               question_features: bool) -> list[dict]:
    """The whole job around a stand-in engine of `ms` per sample: the share of wall time outside the engine,
    for each render-worker count (None: the job's default)."""
    path = build_model(model, work / f"{model}-x{scale}", seed=0, scale=scale) if model in ZOO_NAMES else Path(model)
    teacher = HFTeacher(str(path), "float32", "cpu")
    manifest = write_turns_manifest(work, rows, turns, image_size if teacher.multimodal else None)
    out = []
    for n in workers:
        cfg = CacheConfig(teacher=str(path), manifest=manifest, output=work / f"stub-{n}", dtype=feature_dtype,
                          device="cpu", batch_tokens=batch_tokens, question_features=question_features,
                          progress=False, max_length=0, render_workers=n, command=["bench_cache"])
        job = CacheJob(cfg, StubEngine(teacher, ms))
        t = time.perf_counter()
        res = job.run()
        t_job = time.perf_counter() - t
        out.append({"backend": f"stub-{ms:g}ms", "model": model, "scale": scale, "turns": turns,
                    "image_size": "x".join(map(str, image_size)) if image_size and teacher.multimodal else "",
                    "render_workers": cfg.render_workers, "feature_dtype": feature_dtype, "samples": res.samples,
                    "rejects": res.rejects, "tokens": res.tokens, "label_tokens": res.label_tokens,
                    "t_job_s": round(t_job, 3), "t_engine_s": round(res.forward_seconds, 3),
                    "ms_outside_engine_per_sample": round(1000 * (t_job - res.forward_seconds) / max(res.samples, 1), 2),
                    **_rates(res, t_job)})
        print(out[-1], flush=True)
    return out


def _rates(res, t_job: float) -> dict:
    """Tokens/s of the whole job, and the share of its wall time spent outside the teacher's forward."""
    return {"tokens_per_s": round(res.tokens / t_job, 1),
            "outside_engine_share": round(1 - res.forward_seconds / t_job, 3)}


def bench_engine(cfg, work: Path, model: str, scale: int, device: str, feature_dtype: str) -> dict:
    """The vLLM backend's job, twice on one engine (the first run warms it up); its engine time is what
    `VLLMTeacher.forward` spends, vLLM's own pre/post-processing included."""
    from genrecal_cache.teacher.load import load_teacher

    teacher = load_teacher(cfg(work / "probe").teacher_spec)
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
    ap.add_argument("--stub-engine-ms", type=float, default=None,
                    help="replace the engine by a stand-in that sleeps this long per sample (see above)")
    ap.add_argument("--turns", type=int, default=1, help="with --stub-engine-ms: question/answer pairs per row")
    ap.add_argument("--image-size", default="640x480", help="with --stub-engine-ms: WxH of each row's image")
    ap.add_argument("--render-workers", type=int, nargs="+", default=None,
                    help="with --stub-engine-ms: worker counts to compare (default: the job's default, and 0)")
    ap.add_argument("--out", type=Path, default=Path("bench-cache.csv"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    results = []
    if args.stub_engine_ms is not None:
        w, h = (int(x) for x in args.image_size.lower().split("x"))
        for model in args.model:
            for scale in args.scale:
                with tempfile.TemporaryDirectory() as tmp:
                    results += bench_stub(model, scale, args.rows, args.stub_engine_ms, args.turns, (w, h),
                                          args.render_workers or [None, 0], args.feature_dtype[0],
                                          args.batch_tokens, Path(tmp), args.question_features)
        _write(results, args.out)
        return
    for model in args.model:
        for scale in args.scale:
            for fd in args.feature_dtype:
                for backend in args.backend.split(","):
                    with tempfile.TemporaryDirectory() as tmp:
                        results.append(bench(model, scale, args.rows, args.dtype, fd, args.batch_tokens, Path(tmp),
                                             args.question_features, backend))
                    print(results[-1], flush=True)
    _write(results, args.out)


def _write(results: list[dict], out: Path) -> None:
    fields = list(dict.fromkeys(k for r in results for k in r))
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
