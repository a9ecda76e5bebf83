"""Zarr's two object-store backends against a local folder, in one run: `FsspecStore` (s3fs) and `ObjectStore`
(obstore, as `Location.zarr_store()` builds it for s3://) writing and reading the same sharded bf16 feature arrays
as the teacher store (its codecs, chunk and shard shapes and array config: genrecal_cache/store/format.py) at each
--d. docs/store.md, "Object stores", has the figures.

What is measured (MB/s of uncompressed feature bytes, wall time; the CSV also has MB per CPU-second of this process):
  write       one whole shard per setitem, in order (as PartWriter writes a commit)
  read shard  one whole shard per getitem, in order
  read all    the whole array in one getitem (zarr fetches its shards concurrently)
Each repeat writes a fresh array per backend and width (deleted after it, untimed); backends run back to back in a
rotated order per repeat (a change of load on a shared machine hits them alike); the CSV keeps medians. Reads follow
the write at once, so local reads may come from the page cache (the store reader is CPU-bound: docs/store.md).

Without --url a SeaweedFS server is started for the run (tools/s3server.py, in --dir): client and server then share
this machine's cores, as they would on a node with a local gateway.

Example (the figures in docs/store.md):
    python tools/bench_object_store.py --d 3584 8192 --mib 128 --repeats 5 --out tools/results/bench-object-store.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import zarr
from zarr.storage import FsspecStore

from genrecal_cache.core.locations import Location, parse_storage_options
from genrecal_cache.store.format import ARRAY_CONFIG, ArraySpec, codecs

MB = 1e6
FIELDS = ["backend", "d", "shards", "feature_mib", "stored_mib", "write_mbs", "read_shard_mbs", "read_all_mbs",
          "write_cpu_mbs", "read_shard_cpu_mbs", "read_all_cpu_mbs", "write_vs_local", "read_shard_vs_local",
          "read_all_vs_local", "repeats", "cores", "loadavg_1m"]


def features(d: int, rows: int, seed: int) -> np.ndarray:
    """Hidden-state-like rows rounded to bf16, as uint16 bits (tools/bench_store.py's generator: per-channel scales
    and offsets, four massive channels); zstd takes the same ~1.26x off them as off real activations."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, d), dtype=np.float32)
    z += rng.normal(0.0, 0.5, d).astype(np.float32)
    z *= np.exp(rng.normal(0.0, 0.6, d)).astype(np.float32)
    z[:, rng.choice(d, 4, replace=False)] *= 50.0
    return torch.from_numpy(z).to(torch.bfloat16).view(torch.uint16).numpy()


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def one(make_store: Callable[[], object], data: np.ndarray, spec: ArraySpec) -> dict[str, float]:
    """Write, read shard by shard, read whole: seconds of wall and CPU time for each, and the stored bytes."""
    store = make_store()
    arr = zarr.create_array(store, shape=data.shape, dtype="uint16", chunks=spec.shape(spec.chunk_rows),
                            shards=spec.shape(spec.shard_rows), compressors=codecs(), fill_value=0,
                            config=ARRAY_CONFIG)
    out = {}
    t = clock()
    for s in range(0, len(data), spec.shard_rows):
        arr[s : s + spec.shard_rows] = data[s : s + spec.shard_rows]
    out["write"] = [a - b for a, b in zip(clock(), t)]
    arr = zarr.open_array(make_store(), mode="r")
    t = clock()
    for s in range(0, len(data), spec.shard_rows):
        back = arr[s : s + spec.shard_rows]
    out["read_shard"] = [a - b for a, b in zip(clock(), t)]
    assert np.array_equal(back, data[len(data) - len(back) :])
    t = clock()
    back = arr[:]
    out["read_all"] = [a - b for a, b in zip(clock(), t)]
    assert np.array_equal(back, data), "read back differs"
    out["stored"] = arr.nbytes_stored() if hasattr(arr, "nbytes_stored") else 0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="s3://bucket/prefix to write under (default: a SeaweedFS started "
                   "for the run)")
    p.add_argument("--storage-options", default=None, help="s3fs options for --url (JSON, YAML or a file); "
                   "without them, what botocore reads from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)")
    p.add_argument("--d", type=int, nargs="+", default=[3584, 8192], help="feature widths (7B: 3584, 72B: 8192)")
    p.add_argument("--mib", type=int, default=64, help="feature MiB per width, rounded up to whole shards (min 2)")
    p.add_argument("--backends", nargs="+", choices=["local", "fsspec", "obstore"],
                   default=["local", "fsspec", "obstore"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="local folder to write in (default: $TMPDIR)")
    p.add_argument("--out", type=Path, default=None, help="CSV to write")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-object-store-"))
    server = None
    try:
        if args.url is None:
            from s3server import S3Server

            server = S3Server(work / "seaweedfs", bucket="bench").start()
            options, url = server.storage_options(), server.url("bench-object-store")
        else:
            options, url = parse_storage_options(args.storage_options), args.url.rstrip("/")
        remote = Location.of(url, options)
        remote.check_reachable()
        makers: dict[str, Callable[[str], Callable[[], object]]] = {
            "local": lambda name: lambda: Location.of(work / "local" / name).zarr_store(),
            "fsspec": lambda name: lambda: FsspecStore.from_url(remote.join(name).url, storage_options=options),
            "obstore": lambda name: lambda: remote.join(name).zarr_store(),  # what GenRecal uses for s3://
        }
        cleanup = {"local": lambda name: shutil.rmtree(work / "local" / name, ignore_errors=True),
                   "fsspec": lambda name: remote.fs.rm(remote.join(name).path, recursive=True),
                   "obstore": lambda name: remote.fs.rm(remote.join(name).path, recursive=True)}
        rows = []
        for d in args.d:
            spec = ArraySpec("features", "labels", d, "uint16")
            shards = max(2, -(-(args.mib << 20) // (spec.shard_rows * spec.row_bytes)))
            data = features(d, shards * spec.shard_rows, seed=d)
            runs: dict[str, list[dict]] = {b: [] for b in args.backends}
            for b in args.backends:  # imports, thread pools, connections
                one(makers[b](f"warm-up-{d}"), data[: 2 * spec.shard_rows], spec)
                cleanup[b](f"warm-up-{d}")
            for rep in range(args.repeats):
                order = args.backends[rep % len(args.backends):] + args.backends[: rep % len(args.backends)]
                for b in order:
                    name = f"d{d}-r{rep}-{b}"
                    runs[b].append(one(makers[b](name), data, spec))
                    cleanup[b](name)
            for b in args.backends:
                med = {k: [statistics.median(r[k][i] for r in runs[b]) for i in (0, 1)]
                       for k in ("write", "read_shard", "read_all")}
                row = {"backend": b, "d": d, "shards": shards, "feature_mib": round(data.nbytes / 2**20, 1),
                       "stored_mib": round(statistics.median(r["stored"] for r in runs[b]) / 2**20, 1),
                       "repeats": args.repeats, "cores": len(os.sched_getaffinity(0)),
                       "loadavg_1m": round(os.getloadavg()[0], 2)}
                for k, (wall, cpu) in med.items():
                    row[f"{k}_mbs"] = round(data.nbytes / MB / wall, 1)
                    row[f"{k}_cpu_mbs"] = round(data.nbytes / MB / cpu, 1)
                rows.append(row)
            local = next((r for r in rows[-len(args.backends):] if r["backend"] == "local"), None)
            for row in rows[-len(args.backends):]:
                for k in ("write", "read_shard", "read_all"):
                    row[f"{k}_vs_local"] = round(row[f"{k}_mbs"] / local[f"{k}_mbs"], 2) if local else ""
                print(f"d={d:5d} {row['backend']:8s} write {row['write_mbs']:6.1f} MB/s  read by shard "
                      f"{row['read_shard_mbs']:6.1f}  read all {row['read_all_mbs']:6.1f}  (vs local: "
                      f"{row['write_vs_local']}, {row['read_shard_vs_local']}, {row['read_all_vs_local']}; "
                      f"load {row['loadavg_1m']})", flush=True)
    except Exception:
        if server is not None:
            print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)


if __name__ == "__main__":
    main()
