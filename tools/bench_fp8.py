"""Fidelity of `--feature-dtype fp8` against bf16 features: over the stored answer tokens, the teacher head's
distribution from fp8 features against the one from bf16 features (mean and 99.9th-percentile KL in nats, top-1
agreement, mean |Δ log p(target)|), and the store's bytes against the bf16 store of the same job.

Teachers: every tiny-zoo VLM and LM family built from its config (`tools/tiny_zoo.py`), each cached twice over the
demo manifest (`--dtype bfloat16 --feature-dtype bfloat16`, then `fp8`; the fp8 store quantises the same bf16
values), and any `--teacher NAME=DIR=MANIFEST` given (e.g. a trained digits teacher). Then a synthetic check at
real width: rows of D = 3584 with a few channels 100x the median magnitude through a random head of V = 32000.
    python tools/bench_fp8.py --csv tools/results/bench-fp8.csv \
        --teacher digits=/tmp/exp-transfer/task-noise0.35-rotate20/teachers/e16-t0=/tmp/exp-transfer/task-noise0.35-rotate20/data/student.jsonl
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from genrecal_cache.store.dtypes import FP8, stored_features  # noqa: E402
from genrecal_cache.store.head import TeacherHead  # noqa: E402

DECIDED = 0.01  # a top-1 that leads its second by at least this much probability
FEATURE_ARRAYS = ("features", "question_features")  # and their _scale arrays


def head_figures(head: TeacherHead, ref: torch.Tensor, test: torch.Tensor, targets: torch.Tensor,
                 chunk: int = 256) -> dict[str, float]:
    """KL(p_ref || p_test) per token (mean, 99.9th percentile), top-1 agreement (over every token, and over the
    tokens whose reference top-1 leads its second by at least `DECIDED` of probability: a near-tie at the top, as
    a flat distribution has, flips at any precision) and mean |Δ log p(target)|, with the log-softmax in float64."""
    kls, dlogp, same, decided = [], [], [], []
    for (rows, a), (_, b) in zip(head.log_probs(ref, chunk), head.log_probs(test, chunk)):  # (n, V) each
        kls.append((a.exp() * (a - b)).sum(-1))
        t = targets[rows, None]
        dlogp.append((a.gather(1, t) - b.gather(1, t)).abs().squeeze(1))
        same.append(a.argmax(-1) == b.argmax(-1))
        top2 = a.exp().topk(min(2, a.shape[1]), -1).values  # (n, 2)
        decided.append(top2[:, 0] - top2[:, -1] >= DECIDED)
    kl, d, same, decided = (torch.cat(x) for x in (kls, dlogp, same, decided))
    assert torch.isfinite(kl).all() and torch.isfinite(d).all(), "non-finite fidelity figures"
    return {"tokens": len(ref), "kl_mean": float(kl.mean()), "kl_p999": float(torch.quantile(kl, 0.999)),
            "top1_agreement": float(same.double().mean()), "decided_tokens": int(decided.sum()),
            "top1_agreement_decided": float(same[decided].double().mean()) if decided.any() else float("nan"),
            "dlogp_target_mean": float(d.mean())}


def _cache(teacher: Path, manifest: Path, out: Path, feature_dtype: str, max_samples: int) -> None:
    cmd = [sys.executable, "-m", "genrecal_cache", "cache-teacher", "--teacher", str(teacher), "--manifest",
           str(manifest), "--output", str(out), "--dtype", "bfloat16", "--feature-dtype", feature_dtype, "--device",
           "cpu", "--question-features", "--no-progress", "--max-samples", str(max_samples)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "2", **_env()})
    if done.returncode != 0:
        raise SystemExit(f"cache-teacher failed for {teacher} ({feature_dtype}):\n{done.stderr[-3000:]}")


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tools"),
                                                          os.environ.get("PYTHONPATH", "")])}


def teacher_row(name: str, teacher: Path, manifest: Path, work: Path, max_samples: int) -> dict:
    """Cache the job twice (bf16, fp8 features) and compare what the head makes of each."""
    from genrecal_cache.inspection import summary
    from genrecal_cache.store.reader import TeacherStore

    stores = {}
    for fd in ("bfloat16", "fp8"):
        _cache(teacher, manifest, work / f"{name}-{fd}", fd, max_samples)
        stores[fd] = TeacherStore(work / f"{name}-{fd}")
    samples = {fd: [x for p in s.parts for x in p.read(0, len(p))] for fd, s in stores.items()}
    ids = [x.sample_id for x in samples["bfloat16"]]
    assert ids == [x.sample_id for x in samples["fp8"]], "the two stores hold other samples"
    ref = torch.cat([x.features.float() for x in samples["bfloat16"]])
    test = torch.cat([x.features for x in samples["fp8"]])
    targets = torch.cat([x.targets for x in samples["bfloat16"]])
    sizes = {fd: summary(s) for fd, s in stores.items()}

    def token_bytes(s: dict, only: tuple[str, ...] | None = None) -> int:  # the per-token arrays (all, or these)
        return sum(b["bytes_on_disk"] for p in s["parts"] for name, b in p["arrays"].items()
                   if only is None or name.removesuffix("_scale") in only)

    return {"teacher": name, "hidden_size": ref.shape[1], **head_figures(stores["bfloat16"].teacher_head(), ref, test,
                                                                           targets),
            "feature_bytes_ratio": token_bytes(sizes["fp8"], FEATURE_ARRAYS) / token_bytes(sizes["bfloat16"],
                                                                                          FEATURE_ARRAYS),
            "token_bytes_ratio": token_bytes(sizes["fp8"]) / token_bytes(sizes["bfloat16"]),
            "store_bytes_ratio": sizes["fp8"]["bytes_on_disk"] / sizes["bfloat16"]["bytes_on_disk"]}


def synthetic_row(d: int = 3584, vocab: int = 32000, n: int = 2048, outliers: int = 4, seed: int = 0) -> dict:
    """Rows like a real LLM's last hidden states (Gaussian, `outliers` channels at 100x the median magnitude)
    through a random head whose logits spread by a few nats; bytes are those of the zstd-compressed arrays."""
    import numcodecs

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, torch.randperm(d, generator=g)[:outliers]] *= 100 / x.abs().median()
    w = torch.randn(vocab, d, generator=g) * (3.0 / x.norm(dim=1).median())  # logits with a std of about 3
    head = TeacherHead(w)
    ref = x.bfloat16().float()
    test = stored_features(ref, FP8)
    targets = torch.multinomial(torch.softmax(head.logits(ref[:n]), -1), 1, generator=g).squeeze(1)
    zstd = numcodecs.Zstd(level=3)
    bf16 = len(zstd.encode(ref.bfloat16().view(torch.uint16).numpy().tobytes()))
    from genrecal_cache.store.dtypes import encode_features

    bits, scale = encode_features(ref, FP8)
    fp8 = len(zstd.encode(bits.tobytes())) + len(zstd.encode(scale.tobytes()))
    return {"teacher": f"synthetic D={d} V={vocab} ({outliers} outlier channels)", "hidden_size": d,
            **head_figures(head, ref, test, targets), "feature_bytes_ratio": fp8 / bf16, "token_bytes_ratio": np.nan,
            "store_bytes_ratio": np.nan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=Path, default=ROOT / "tools" / "results" / "bench-fp8.csv")
    ap.add_argument("--teacher", action="append", default=[], help="NAME=DIR=MANIFEST: one more teacher to measure")
    ap.add_argument("--max-samples", type=int, default=200, help="rows of each manifest cached")
    ap.add_argument("--no-zoo", action="store_true", help="only the --teacher ones and the synthetic check")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teachers = []
        if not args.no_zoo:
            from demo_data import write_demo_manifest
            from tiny_zoo import FAMILY_NAMES, ZOO_NAMES, build_zoo

            manifest = write_demo_manifest(work / "demo", n=48, seed=0, bad_rows=False)
            text = work / "text.jsonl"
            text.write_text("".join(f'{{"id": "t{i}", "messages": [{{"role": "user", "content": "Say {w}."}}, '
                                    f'{{"role": "assistant", "content": "{w} {w}"}}]}}\n'
                                    for i, w in enumerate(("one two three four five six seven eight nine ten "
                                                           "eleven twelve").split())))
            zoo = build_zoo(work / "zoo", seed=0, names=ZOO_NAMES + FAMILY_NAMES)
            teachers += [(n, p, text if n in ("textlm", "granite") else manifest) for n, p in zoo.items()]
        for spec in args.teacher:
            name, teacher, manifest = spec.split("=")
            teachers.append((name, Path(teacher), Path(manifest)))
        for name, teacher, manifest in teachers:
            rows.append(teacher_row(name, teacher, manifest, work, args.max_samples))
            print(_line(rows[-1]), flush=True)
        rows.append(synthetic_row())
        print(_line(rows[-1]), flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")


def _line(r: dict) -> str:
    return (f"{r['teacher']:<42} D={r['hidden_size']:<5} tokens {r['tokens']:>6}  KL mean {r['kl_mean']:.2e} "
            f"p99.9 {r['kl_p999']:.2e}  top-1 {r['top1_agreement']:.2%} ({r['top1_agreement_decided']:.2%} of "
            f"{r['decided_tokens']} decided)  |dlogp| {r['dlogp_target_mean']:.2e}  bytes x{r['feature_bytes_ratio']:.2f}"
            f" (features) x{r['token_bytes_ratio']:.2f} (arrays) x{r['store_bytes_ratio']:.2f} (store)")


if __name__ == "__main__":
    main()
