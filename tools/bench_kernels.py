"""Benchmark fused_linear_ce_kl: naive vs chunked PyTorch vs Triton (and Liger-Kernel's fused linear JSD with
beta=0 where it is installed), forward+backward time and peak extra memory, over sizes given as arguments.

Each (impl, size) is measured in a fresh subprocess, so peak memory is that impl's alone (GPU: max allocated;
CPU: peak RSS above the inputs). Writes CSV. Example:
    python tools/bench_kernels.py --n 1024 4096 --v 32000 --d 896 --impls naive chunked --out bench-kernels.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def setup(n: int, v: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    """The inputs every implementation gets: r (N, D) needing a gradient, z (N, D), W (V, D), targets (N,)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device, dtype)
    r = torch.randn(n, d, generator=g).to(device, dtype)
    z = (r.float() + 0.5 * torch.randn(n, d, generator=g).to(device)).to(dtype)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[::16] = -100
    return r, z, w, t


def _liger_loss():
    from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: F401 (import check)

    jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=1.0)

    def run(r, z, w, t):  # beta=0: forward KL(teacher || student), the closest peer; no CE term
        return jsd(r, w, z, w, t)

    return run


def _loop_loss(rows: int = 256):
    """The plain baseline the chunked path has to beat: the naive loss on `rows` rows at a time, each chunk's
    gradient taken by autograd at once (one chunk's graph alive at a time) and handed back through a surrogate."""
    from genrecal_kernels.fused_linear_ce_kl import naive_linear_ce_kl

    def run(x, z, w, t):
        normalizer = max(1, int((t != -100).sum()))
        grad = torch.empty_like(x)  # (N, D)
        total = torch.zeros((), device=x.device)
        for s in range(0, len(x), rows):
            xs = x[s:s + rows].detach().requires_grad_()  # (C, D)
            loss = naive_linear_ce_kl(xs, z[s:s + rows], w, t[s:s + rows], normalizer=normalizer).loss
            grad[s:s + rows] = torch.autograd.grad(loss, xs)[0]
            total += loss.detach()
        return total + (x * grad).sum() - (x.detach() * grad).sum()  # value: total; d/dx: grad

    return run


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(impl: str, n: int, v: int, d: int, dtype: str, device: str, repeats: int) -> dict:
    """Time and peak memory of one implementation at one size (run in its own process)."""
    from genrecal_kernels import fused_linear_ce_kl

    dt = getattr(torch, dtype)
    r, z, w, t = setup(n, v, d, dt, device)
    if impl == "liger":
        liger = _liger_loss()
        step = lambda x: liger(x, z, w, t)  # noqa: E731
    elif impl == "loop":
        loop = _loop_loss()
        step = lambda x: loop(x, z, w, t)  # noqa: E731
    else:
        step = lambda x: fused_linear_ce_kl(x, z, w, t, impl=impl).loss  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = r.clone().requires_grad_()
    step(x).backward()  # warm-up (Triton compilation)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(repeats):
        x = r.clone().requires_grad_()
        sync()
        t0 = time.perf_counter()
        step(x).backward()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"impl": impl, "n": n, "v": v, "d": d, "dtype": dtype, "device": device,
            "ms": round(1000 * statistics.median(times), 2), "peak_extra_mib": round(max(peak, 0) / 2**20, 1),
            "tflops": round(6 * n * v * d / statistics.median(times) / 1e12, 3)}


def matmul_rate(dtype: str, device: str) -> float:
    """The dense matmul rate (TFLOP/s) of this device and dtype, for the '>= 50% of matmul rate' target."""
    dt = getattr(torch, dtype)
    a = torch.randn(4096, 4096, device=device, dtype=dt)
    b = torch.randn(4096, 4096, device=device, dtype=dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    reps = 20 if device == "cuda" else 2
    for _ in range(reps):
        a @ b
    sync()
    return round(2 * 4096**3 * reps / (time.perf_counter() - t0) / 1e12, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--v", type=int, nargs="+", default=[32000, 152064])
    ap.add_argument("--d", type=int, nargs="+", default=[896, 3584, 8192])
    ap.add_argument("--impls", nargs="+", default=None, help="default: naive chunked triton (+liger on CUDA)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per measurement")
    ap.add_argument("--out", type=Path, default=Path("bench-kernels.csv"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    ap.add_argument("--compile-report", action="store_true", help="print the kernels' ahead-of-time compile report "
                    "(registers, spills, shared memory for sm_80 / sm_90; tools/compile_report.py) and exit")
    args = ap.parse_args()
    if args.compile_report:
        import compile_report

        sys.exit(compile_report.main([]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    impls = args.impls or (["naive", "chunked", "triton", "liger"] if device == "cuda" else ["naive", "chunked"])
    rows = []
    rate = matmul_rate(dtype, device)
    print(f"device {device}, dtype {dtype}, dense matmul {rate} TFLOP/s", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    for n in args.n:
        for v in args.v:
            for d in args.d:
                for impl in impls:
                    spec = dict(impl=impl, n=n, v=v, d=d, dtype=dtype, device=device, repeats=args.repeats)
                    try:
                        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                                           capture_output=True, text=True, timeout=args.timeout)
                        row = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {
                            **spec, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:120]}
                    except subprocess.TimeoutExpired:
                        row = {**spec, "error": f"timeout {args.timeout}s"}
                    row.pop("repeats", None)
                    row["matmul_tflops"] = rate
                    rows.append(row)
                    print(row, flush=True)
    fields = ["impl", "n", "v", "d", "dtype", "device", "ms", "peak_extra_mib", "tflops", "matmul_tflops", "error"]
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in fields})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
