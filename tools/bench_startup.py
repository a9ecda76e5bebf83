"""Benchmark what a `cache-teacher` start spends on the dataset before its teacher loads: every file's sha256 (the
source identity a resume is checked against) and the pass over the rows' ids (the --duplicate-ids plan).

Builds a manifest folder of `--gib` GiB of JSONL shards (rows with one inline image each), then times, each in a
fresh interpreter: a start as before digests were kept (every file digested, every id read), the first start
(empty digest cache) and a second start (digests and ids kept). Writes CSV. Example:
    python tools/bench_startup.py --gib 2 --csv tools/results/bench-startup.csv
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One start's dataset work, timed in the child: (rehash and read every id) or the job's own path.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from genrecal_cache.data.sources import open_source
from genrecal_cache.job.config import DuplicateIds
from genrecal_cache.job.preflight import plan_ids
old = sys.argv[2] == "before"
t1 = time.perf_counter()
source = open_source(sys.argv[1])
identity = source.identity(rehash=old)
t2 = time.perf_counter()
ids = source.ids("id") if old else source.kept_ids("id", identity)
rows = plan_ids(ids, DuplicateIds.suffix)[0]
t3 = time.perf_counter()
print(json.dumps({"digest_s": t2 - t1, "ids_s": t3 - t2, "rows": rows}))
"""


def write_folder(folder: Path, gib: float, shards: int = 8, row_kib: int = 96) -> int:
    """`gib` GiB of JSONL in `shards` files, rows of about `row_kib` KiB (one inline image); returns the rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = int(gib * 2**30 / (row_kib << 10))
    image = base64.b64encode(os.urandom((row_kib << 10) * 3 // 4)).decode()
    for k in range(shards):
        with open(folder / f"train-{k:05d}-of-{shards:05d}.jsonl", "w") as f:
            for i in range(k, rows, shards):
                f.write(json.dumps({"id": f"s{i}", "images": [image], "messages": [
                    {"role": "user", "content": "<image>What is shown?"},
                    {"role": "assistant", "content": f"answer {i}"}]}) + "\n")
    return rows


def start(folder: Path, how: str, cache: Path) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), how], env=env, capture_output=True, text=True,
                       check=False)
    if p.returncode != 0:
        sys.exit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="size of the manifest folder")
    ap.add_argument("--repeats", type=int, default=3, help="starts of each kind (the median is reported)")
    ap.add_argument("--csv", type=Path, default=ROOT / "tools" / "results" / "bench-startup.csv")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        folder = Path(tmp) / "manifest"
        n = write_folder(folder, args.gib)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
        rows = []
        for r in range(args.repeats):
            for case, how, cache in (("before (digest and read ids every start)", "before", f"before-{r}"),
                                     ("first start", "kept", f"kept-{r}"),  # an empty digest cache
                                     ("second start", "kept", f"kept-{r}")):
                t = start(folder, how, Path(tmp) / cache)
                assert t["rows"] == n, t
                rows.append({"case": case, "repeat": r, "gib": round(size, 3), "rows": n,
                             "digest_s": round(t["digest_s"], 4), "ids_s": round(t["ids_s"], 4),
                             "total_s": round(t["digest_s"] + t["ids_s"], 4)})
                print(rows[-1], flush=True)
    med = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        totals = sorted(r["total_s"] for r in rows if r["case"] == case)
        med[case] = totals[len(totals) // 2]
    first = med["first start"]
    for r in rows:
        r["median_total_s"] = med[r["case"]]
        r["ratio_to_first"] = round(med[r["case"]] / first, 4)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{size:.2f} GiB, {n} rows; median seconds of dataset work at start-up:")
    for case, s in med.items():
        print(f"  {case:<42} {s:8.3f}  ({s / first:.3f}x the first start)")
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
