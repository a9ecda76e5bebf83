"""Benchmark the teacher store's throughput at real widths against plain files of the same bytes, in the same run.

What is measured (MB/s are always of the bf16 feature bytes, uncompressed: `features` + `question_features`):
  store write  the real `PartWriter`: `add(SampleRecord(...))` per sample, `commit()` every --commit-every
               samples and at the end, as `cache.py` does (top-k, targets, token ids and the sample table are
               written too, and their cost is counted against the feature bytes).
  plain write  the same feature arrays appended with numpy `tofile` to two files, fsync'd at the same commit
               points (the store fsyncs every shard file and directory at each commit).
  store read   the real reader: `TeacherStore` + `Part.read(start, stop)` over blocks of --block-size samples in
               the trainer's shuffled block order (`genrecal_train.data.block_order`).
  plain read   numpy `fromfile` of the same bytes, the same blocks in the same order.
Reads are cold: every file of the store and the plain files gets `posix_fadvise(POSIX_FADV_DONTNEED)` first
(all of them are fsync'd, so clean, so the kernel drops them); without it a read right after the write would be
served from the page cache. The warm rate (an immediate second read) is reported beside it.

Sections:
  main     each --d with the store's current codecs and chunk shapes (store_format.py).
  sweep    at the largest --d: each codec pipeline in --codecs, then each chunk size in --chunk-kib (the
           writer's `codecs()` and `CHUNK_BYTES` swapped in for the run; the reader follows the metadata).
  encoder  at each --d, the same shards written by zarr one shard per setitem (as PartWriter does), by zarr in
           one setitem, and by the bare codecs (numcodecs zstd + crc32c) assembling the shard files directly:
           how much of the writer's cost is zarr's write path rather than compression or the disk.
  object   with --url: at each --d, the same samples written by the real PartWriter to a local folder and to
           the object store (`--url s3://bucket/prefix`, or `--url auto`: a SeaweedFS started for the run on
           127.0.0.1, tools/s3server.py), then read back by the real reader (TeacherStore + Part.read, the
           trainer's block order), in one run, alternating which goes first: MB/s of each and object/local
           (in the CSV the local store's figures are the plain_* columns of these rows); and the server's own
           rate, random 16 MiB objects PUT from 4 threads with no store around them (`object_put_mbs`).
  per-core a child process pinned to one core (1 torch/OpenMP thread): store write and read MB/s, and the
           trainer's read path, `StoreStream.batches()` (store read + the student's rendering of each sample),
           in label tokens/s, with and without question features.
Each configuration runs --repeats times, after one unrecorded warm-up write per width, the repeats of all
configurations of a width interleaved in a rotated order (so a change in the load of a shared machine hits them
alike); every repeat measures plain and store back to back, alternating which goes first. The CSV keeps medians: MB/s of wall time, MB per CPU-second of the process (all threads; steadier on a
loaded machine, blind to waiting on the disk), the store/plain ratios, the writer's wall time by step, and the
bare codecs' CPU rate on the same chunks (`codec_encode_cpu_mbs`).

Data: sample shapes from real renderings (the tiny Qwen2-VL of tools/tiny_zoo.py, one 448x448 JPEG, a question
of --question-tokens and an answer of --answer-tokens tokens, drawn uniformly); features are synthetic hidden
states rounded to bf16 (--data hidden: per-channel scales lognormal(0, 0.6), per-channel offsets N(0, 0.5), four
massive channels x50, Gaussian per token; --data normal: iid N(0, 1)). zstd takes 1.26x off the first, 1.29x
off the second: the mantissa bits are noise, as in real activations. Rows come from a pool of 64 MiB of
distinct rows (much larger than a chunk).

Example (the defaults: about 5 minutes on 2 cores; docs/store.md's table used --repeats 5):
    python tools/bench_store.py --d 3584 8192 --tokens 32768 --out tools/results/bench-store.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from genrecal_cache.core.durable import fsync
from genrecal_cache.data.rows import ImageRef
from genrecal_cache.store import format as store_format
from genrecal_cache.store import writer as store_writer
from genrecal_cache.store.dtypes import to_storage
from genrecal_cache.store.format import FORMAT_VERSION
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.record import SampleRecord
from genrecal_cache.store.shards import StageClock
from genrecal_cache.store.writer import PartWriter, open_or_create

MB = 1e6
POOL_BYTES = 64 << 20
VOCAB = 152_064  # Qwen2's, for the synthetic top-k ids

FIELDS = ["section", "d", "question_features", "codecs", "chunk_kib", "cores", "samples", "label_tokens",
          "question_tokens", "feature_mib", "compression", "compression_all", "plain_write_mbs", "store_write_mbs",
          "write_vs_plain", "plain_write_cpu_mbs", "store_write_cpu_mbs",
          *(f"write_{step}_pct" for step in StageClock.STEPS),  # the writer's time per step (StageClock)
          "codec_encode_cpu_mbs", "object_put_mbs", "plain_read_mbs", "store_read_mbs", "read_vs_plain", "plain_read_cpu_mbs",
          "store_read_cpu_mbs", "plain_read_warm_mbs", "store_read_warm_mbs", "read_label_tok_s",
          "read_label_tok_cpu_s", "stream_label_tok_s", "stream_label_tok_cpu_s", "stream_mbs", "stream_cpu_mbs",
          "repeats"]


# --- codec pipelines -------------------------------------------------------------------------------------------

def parse_codecs(spec: str) -> Callable[[], list]:
    """'default' (store_format.codecs()), 'none' (crc32c only), 'zstdN', 'shuffle+zstdN', 'bitshuffle+zstdN',
    'shuffle+lz4': each followed by the crc32c checksum, as the store's own pipeline is."""
    if spec == "default":
        return store_format.codecs
    if spec == "none":
        return lambda: [Crc32cCodec()]
    shuffle, _, comp = spec.rpartition("+")
    if not shuffle and comp.startswith("zstd"):
        level = int(comp[4:])
        return lambda: [ZstdCodec(level=level), Crc32cCodec()]
    if shuffle in ("shuffle", "bitshuffle"):
        cname, level = ("zstd", int(comp[4:])) if comp.startswith("zstd") else (comp, 5)
        return lambda: [BloscCodec(cname=cname, clevel=level, shuffle=shuffle), Crc32cCodec()]
    raise argparse.ArgumentTypeError(f"unknown codec pipeline {spec!r}")


def describe(codecs: list) -> str:
    out = []
    for c in codecs:
        d = c.to_dict()
        cfg = d.get("configuration", {})
        if d["name"] == "zstd":
            out.append(f"zstd{cfg['level']}")
        elif d["name"] == "blosc":
            out.append(f"{cfg['shuffle']}+{cfg['cname']}{cfg['clevel']}")
        else:
            out.append(d["name"])
    return "+".join(out)


@contextlib.contextmanager
def store_settings(codecs: Callable[[], list], chunk_kib: int) -> Iterator[None]:
    """The writer's codec pipeline and chunk size, swapped in for one run."""
    old = store_writer.codecs, store_format.CHUNK_BYTES
    store_writer.codecs, store_format.CHUNK_BYTES = codecs, chunk_kib << 10
    try:
        yield
    finally:
        store_writer.codecs, store_format.CHUNK_BYTES = old


# --- data ------------------------------------------------------------------------------------------------------

def feature_pool(d: int, kind: str, seed: int) -> torch.Tensor:
    """POOL_BYTES of distinct bf16 rows of width d."""
    rng = np.random.default_rng(seed)
    rows = max(1024, POOL_BYTES // (2 * d))
    z = rng.standard_normal((rows, d), dtype=np.float32)
    if kind == "hidden":
        scale = np.exp(rng.normal(0.0, 0.6, d)).astype(np.float32)
        offset = rng.normal(0.0, 0.5, d).astype(np.float32)
        z += offset
        z *= scale
        z[:, rng.choice(d, 4, replace=False)] *= 50.0
    return torch.from_numpy(z).to(torch.bfloat16)


def jpeg(rng: np.random.Generator, size: int = 448) -> bytes:
    """A photo-like JPEG: smooth random colour fields plus noise (a real image's size and decode cost)."""
    from PIL import Image

    small = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    a = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Conversation:
    messages: list[dict]
    image: bytes
    token_ids: np.ndarray
    label_mask: np.ndarray
    targets: np.ndarray
    segments: list[dict]


def conversations(model: Path, n: int, answer: tuple[int, int], question: tuple[int, int], seed: int
                  ) -> list[Conversation]:
    """`n` conversations (one image, a question, an answer) rendered by the tiny Qwen2-VL's processor."""
    from tiny_zoo import _WORDS

    from genrecal_cache.core.models import load_processor
    from genrecal_cache.data.render import Renderer
    from genrecal_cache.data.rows import Row, parse_row

    renderer = Renderer(load_processor(model))
    words = [w for w in _WORDS if w.strip() and ":" not in w and "\n" not in w]
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    probe = " ".join(rng.choice(words) for _ in range(2000))
    per_word = len(renderer.tokenizer(probe).input_ids) / 2000

    def text(tokens: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, round(tokens / per_word))))

    images = [jpeg(nrng) for _ in range(min(n, 16))]
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text(rng.randint(*question))}]},
                {"role": "assistant", "content": [{"type": "text", "text": text(rng.randint(*answer))}]}]
        image = images[i % len(images)]
        sample = parse_row(Row(i, {"id": f"c{i}", "messages": msgs, "images": [image]}), model)
        r = renderer.render(sample)
        out.append(Conversation(sample.messages, image, r.input_ids, r.label_mask, r.targets,
                                [s.to_dict() for s in r.segments]))
    return out


def records(convs: list[Conversation], pool: torch.Tensor, rows: int, qf: bool, topk: int, seed: int
            ) -> list[SampleRecord]:
    """Samples until `rows` feature rows (label + question) are reached; features are views into the pool."""
    rng = np.random.default_rng(seed)
    out, at, total = [], 0, 0

    def take(n: int) -> torch.Tensor:
        nonlocal at
        if at + n > len(pool):
            at = 0
        at += n
        return pool[at - n : at]

    i = 0
    while total < rows:
        c = convs[i % len(convs)]
        a = int(c.label_mask.sum())
        p = len(c.token_ids) - a
        ids = torch.from_numpy(rng.integers(0, VOCAB, (a, topk)))
        lps = torch.from_numpy(-np.cumsum(rng.exponential(0.5, (a, topk)), axis=1).astype(np.float32))
        out.append(SampleRecord(
            sample_id=f"s{i:07d}", source_row=i, messages=c.messages, images=[ImageRef(c.image)],
            token_ids=c.token_ids, label_mask=c.label_mask, features=take(a), targets=c.targets,
            segments=c.segments, topk_ids=ids if topk else None, topk_logprobs=lps if topk else None,
            question_features=take(p) if qf else None))
        total += a + (p if qf else 0)
        i += 1
    return out


def meta_for(d: int, qf: bool, topk: int) -> dict:
    return {"format_version": FORMAT_VERSION, "dtype": "bfloat16", "feature_dtype": "bfloat16", "topk": topk,
            "question_features": qf, "layers": [], "teacher": {"hidden_size": d, "name_or_path": "bench"},
            "head": {"dtype": "bfloat16", "tied": True, "bias": False, "logit_scale": 1.0, "softcap": None}}


def feature_bytes(recs: list[SampleRecord]) -> int:
    return sum(r.features.numel() * 2 + (r.question_features.numel() * 2 if r.question_features is not None
                                         else 0) for r in recs)


# --- one measurement -------------------------------------------------------------------------------------------

def drop_cache(path: Path) -> None:
    """posix_fadvise(DONTNEED) on every file under `path` (all fsync'd, so clean: the kernel drops them)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def commit_points(n: int, every: int) -> set[int]:
    return {i for i in range(every - 1, n, every)} | {n - 1}


def clock() -> tuple[float, float]:
    """(wall, CPU time of the whole process: every thread, user + system)."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def write_store(path: Path, recs: list[SampleRecord], meta: dict, every: int,
                steps: dict[str, float] | None = None) -> tuple[float, float]:
    """Write `recs` as one part, committing every `every`; `steps` gets the writer's seconds per step
    (`StageClock`)."""
    open_or_create(path, meta, {})
    w = PartWriter(path, "shard-00000-of-00001", meta, {"command": ["bench_store"]})
    points = commit_points(len(recs), every)
    t = clock()
    for i, r in enumerate(recs):
        w.add(r)
        if i in points:
            w.commit(i + 1)
    w.wait()  # the commits are written on the writer's thread
    dt = since(t)
    w.close()
    if steps is not None:
        steps.update(w.clock.seconds)
    return dt


def write_plain(path: Path, recs: list[SampleRecord], every: int) -> tuple[float, float]:
    path.mkdir(parents=True)
    points = commit_points(len(recs), every)
    t = clock()
    with open(path / "features.bin", "wb") as f, open(path / "question.bin", "wb") as q:
        for i, r in enumerate(recs):
            to_storage(r.features, "bfloat16").tofile(f)
            if r.question_features is not None:
                to_storage(r.question_features, "bfloat16").tofile(q)
            if i in points:
                for x in (f, q):
                    x.flush()
                    os.fsync(x.fileno())
        fsync(path)
    return since(t)


def blocks(n: int, block: int, seed: int) -> list[tuple[int, int]]:
    """The trainer's block order (genrecal_train.data.block_order) for one part of n samples."""
    out = [(s, min(s + block, n)) for s in range(0, n, block)]
    random.Random(seed * 1_000_003).shuffle(out)
    return out


def read_store(path: Path | str, order: list[tuple[int, int]]) -> tuple[float, float, int]:
    store = TeacherStore(path)
    part = store.parts[0]
    t, labels = clock(), 0
    for s, e in order:
        for smp in part.read(s, e):
            labels += len(smp.targets)
    return *since(t), labels


def read_plain(path: Path, recs: list[SampleRecord], order: list[tuple[int, int]], d: int) -> tuple[float, float]:
    fo = np.cumsum([0] + [len(r.features) for r in recs])
    qo = np.cumsum([0] + [len(r.question_features) if r.question_features is not None else 0 for r in recs])
    t = clock()
    with open(path / "features.bin", "rb") as f, open(path / "question.bin", "rb") as q:
        for s, e in order:
            for fh, o in ((f, fo), (q, qo)):
                if o[e] > o[s]:
                    fh.seek(int(o[s]) * 2 * d)
                    a = np.fromfile(fh, np.uint16, int(o[e] - o[s]) * d)
                    torch.from_numpy(a).view(torch.bfloat16)
    return since(t)


def disk_bytes(path: Path, names: tuple[str, ...] | None = None) -> int:
    part = path / "parts" / "shard-00000-of-00001"
    dirs = [part / n for n in names] if names else [d for d in part.iterdir() if (d / "zarr.json").exists()]
    return sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file())


def raw_bytes(recs: list[SampleRecord], meta: dict) -> int:
    """Uncompressed bytes of every array of the part (what `compression_all` divides by the bytes on disk)."""
    return sum(v.nbytes for r in recs for v in r.rows(meta).values())


class Trial:
    """One configuration (samples, width, codecs, chunk size), measured one repeat at a time by `run()`: the
    caller interleaves the repeats of all configurations, so a change in the machine's load (others use it too)
    hits every configuration alike. Each repeat measures plain and store back to back, alternating which goes
    first. `row()`: medians over the repeats of MB/s of wall time and MB per CPU-second of the process (all its
    threads; steadier than wall time on a loaded machine, but blind to time spent waiting on the disk)."""

    def __init__(self, recs: list[SampleRecord], d: int, qf: bool, topk: int, every: int, block: int,
                 codecs: Callable[[], list], chunk_kib: int,
                 stream: Callable[[Path], tuple[float, float, int]] | None = None):
        self.recs, self.d, self.qf, self.topk, self.every = recs, d, qf, topk, every
        self.codecs, self.chunk_kib, self.stream = codecs, chunk_kib, stream
        self.nbytes = feature_bytes(recs)
        self.meta = meta_for(d, qf, topk)
        self.order = blocks(len(recs), block, seed=0)
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.shares: dict[str, list[float]] = {}
        self.comp = self.comp_all = 0.0
        self.runs = 0

    def _add(self, key: str, t: tuple[float, float], amount: float | None = None) -> None:
        amount = self.nbytes / MB if amount is None else amount
        self.wall.setdefault(key, []).append(amount / t[0])
        self.cpu.setdefault(key, []).append(amount / max(t[1], 1e-9))

    def warm_up(self, work: Path) -> None:
        with store_settings(self.codecs, self.chunk_kib):
            write_store(work / "store", self.recs, self.meta, self.every)
        write_plain(work / "plain", self.recs, self.every)
        shutil.rmtree(work / "store")
        shutil.rmtree(work / "plain")

    def run(self, work: Path) -> None:
        recs, d = self.recs, self.d
        store, plain = work / "store", work / "plain"
        kinds = ("plain", "store") if self.runs % 2 == 0 else ("store", "plain")
        with store_settings(self.codecs, self.chunk_kib):
            for kind in kinds:
                if kind == "plain":
                    self._add("plain_write", write_plain(plain, recs, self.every))
                else:
                    steps: dict[str, float] = {}
                    t = write_store(store, recs, self.meta, self.every, steps)
                    self._add("store_write", t)
                    for k, v in steps.items():
                        self.shares.setdefault(k, []).append(100 * v / t[0])
        self.comp = self.nbytes / disk_bytes(store, ("features", "question_features") if self.qf else ("features",))
        self.comp_all = raw_bytes(recs, self.meta) / disk_bytes(store)
        drop_cache(store)
        drop_cache(plain)
        for kind in kinds:
            if kind == "plain":
                self._add("plain_read", read_plain(plain, recs, self.order, d))
            else:
                *t, labels = read_store(store, self.order)
                self._add("store_read", t)
                self._add("read_label_tok_s", t, labels)
        self._add("plain_read_warm", read_plain(plain, recs, self.order, d))
        self._add("store_read_warm", read_store(store, self.order)[:2])
        if self.stream is not None:
            drop_cache(store)
            *t, n = self.stream(store)
            self._add("stream_label_tok_s", t, n)
            self._add("stream", t)
        shutil.rmtree(store)
        shutil.rmtree(plain)
        self.runs += 1

    def row(self) -> dict:
        wall, cpu, recs, med = self.wall, self.cpu, self.recs, statistics.median

        def ratio(a: str, b: str) -> float:
            return round(med(x / y for x, y in zip(wall[a], wall[b])), 3)

        codecs = self.codecs()
        row = {
            "d": self.d, "question_features": self.qf, "codecs": describe(codecs), "chunk_kib": self.chunk_kib,
            "samples": len(recs), "label_tokens": sum(len(r.features) for r in recs),
            "question_tokens": sum(len(r.question_features) for r in recs) if self.qf else 0,
            "feature_mib": round(self.nbytes / 2**20, 1), "compression": round(self.comp, 3),
            "compression_all": round(self.comp_all, 3), "repeats": self.runs,
            "write_vs_plain": ratio("store_write", "plain_write"), "read_vs_plain": ratio("store_read", "plain_read"),
        }
        for k in wall:
            if k.endswith("tok_s"):
                row[k], row[k.replace("_s", "_cpu_s")] = round(med(wall[k])), round(med(cpu[k]))
            elif k == "stream":
                row["stream_mbs"], row["stream_cpu_mbs"] = round(med(wall[k]), 1), round(med(cpu[k]), 1)
            else:
                row[f"{k}_mbs"] = round(med(wall[k]), 1)
        for k in ("plain_write", "store_write", "plain_read", "store_read"):
            row[f"{k}_cpu_mbs"] = round(med(cpu[k]), 1)
        for k, v in self.shares.items():
            row[f"write_{k}_pct"] = round(med(v))
        chunk_rows = max(1, 2 ** math.ceil(math.log2(math.ceil((self.chunk_kib << 10) / (2 * self.d)))))
        row["codec_encode_cpu_mbs"] = codec_cpu(recs, self.d, codecs, chunk_rows)
        return row


def run_trials(trials: list[Trial], work: Path, repeats: int, label: Callable[[Trial], str]) -> None:
    """Width by width: one unrecorded warm-up write (the first write at a new width pays for fresh memory: the
    commit's concatenation page-faults; measured, it biased whichever configuration came first by up to 2x),
    then the repeats, each running that width's configurations in a rotated order."""
    for d in dict.fromkeys(t.d for t in trials):
        group = [t for t in trials if t.d == d]
        group[0].warm_up(work)
        for rep in range(repeats):
            for t in group[rep % len(group):] + group[: rep % len(group)]:
                start = time.perf_counter()
                t.run(work)
                print(f"  repeat {rep + 1}/{repeats} {label(t)}: {time.perf_counter() - start:.1f} s",
                      file=sys.stderr, flush=True)


# --- what the codecs alone cost ------------------------------------------------------------------------------

def bare_codec(codecs: list) -> Callable[[np.ndarray], bytes]:
    """The codec pipeline as plain numcodecs calls + crc32c (what zarr's pipeline computes, without zarr)."""
    import google_crc32c
    from numcodecs import Blosc, Zstd

    steps = []
    for c in codecs:
        d = c.to_dict()
        cfg = d.get("configuration", {})
        if d["name"] == "zstd":
            steps.append(Zstd(cfg["level"]).encode)
        elif d["name"] == "blosc":
            shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
            steps.append(Blosc(cfg["cname"], cfg["clevel"], shuffle[cfg["shuffle"]], typesize=2).encode)

    def encode(chunk: np.ndarray) -> bytes:
        out = chunk
        for f in steps:
            out = f(out)
        out = bytes(memoryview(out).cast("B"))
        return out + np.uint32(google_crc32c.value(out)).tobytes()
    return encode


def codec_cpu(recs: list[SampleRecord], d: int, codecs: list, chunk_rows: int) -> float:
    """MB per CPU-second of the bare codecs (one thread) over up to 64 MiB of the features, in chunks."""
    rows = torch.cat([x for r in recs[:64] for x in (r.features, r.question_features) if x is not None])
    rows = rows.repeat(-(-4 * chunk_rows // len(rows)), 1) if len(rows) < 4 * chunk_rows else rows
    feats = to_storage(rows[: max(4 * chunk_rows, POOL_BYTES // (2 * d))], "bfloat16")
    chunks = [feats[i : i + chunk_rows] for i in range(0, len(feats) - chunk_rows + 1, chunk_rows)]
    enc, rates = bare_codec(codecs), []
    for _ in range(3):
        t = time.thread_time()
        for c in chunks:
            enc(c)
        rates.append(sum(c.nbytes for c in chunks) / (time.thread_time() - t) / MB)
    return round(statistics.median(rates), 1)


def encoder(d: int, data: np.ndarray, work: Path, repeats: int) -> list[dict]:
    """The same shards (16 chunks of 1 MiB, zstd + crc32c as the store's codecs()) written three ways: zarr
    one shard per setitem (as PartWriter.commit does), zarr all shards in one setitem, and the bare codecs
    assembling each shard file themselves (chunks, then the index + its crc32c at the end; checked to read back
    equal through zarr). No fsync: this is the CPU cost of producing the bytes."""
    import zarr

    spec = store_format.ArraySpec("features", "labels", d, "uint16")
    cr, sr = spec.chunk_rows, spec.shard_rows
    if len(data) < 2 * sr:  # at least two whole shards
        data = np.concatenate([data] * -(-2 * sr // len(data)))
    data = data[: len(data) - len(data) % sr]
    codecs = store_format.codecs()
    bare = bare_codec(codecs)

    def create(path: Path) -> zarr.Array:
        return zarr.create_array(str(path), shape=data.shape, chunks=(cr, d), shards=(sr, d), dtype="uint16",
                                 compressors=store_format.codecs(), fill_value=0, config=store_format.ARRAY_CONFIG)

    def per_shard(path: Path) -> None:
        a = create(path)
        for s in range(0, len(data), sr):
            a[s : s + sr] = data[s : s + sr]

    def one_call(path: Path) -> None:
        create(path)[:] = data

    def direct(path: Path) -> None:
        import google_crc32c

        create(path)
        for k, s in enumerate(range(0, len(data), sr)):
            bufs, index, off = [], np.empty((sr // cr, 2), "<u8"), 0
            for j in range(sr // cr):
                c = bare(data[s + j * cr : s + (j + 1) * cr])
                bufs.append(c)
                index[j] = off, len(c)
                off += len(c)
            idx = index.tobytes()
            f = store_format.shard_file(path, k, True)
            f.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "wb") as fh:
                fh.writelines([*bufs, idx, np.uint32(google_crc32c.value(idx)).tobytes()])

    runs: dict[str, list[tuple[float, float]]] = {}
    ways = {"zarr, one shard per setitem (PartWriter)": per_shard, "zarr, all shards in one setitem": one_call,
            "bare codecs, shard files assembled directly": direct}
    for rep in range(repeats):
        for name, fn in ways.items():
            path = work / "encoder"
            t = clock()
            fn(path)
            wall, cpu = since(t)
            runs.setdefault(name, []).append((data.nbytes / wall / MB, data.nbytes / cpu / MB))
            if rep == 0:
                assert np.array_equal(zarr.open_array(str(path), mode="r")[...], data), name
            shutil.rmtree(path)
    return [{"section": "encoder", "d": d, "codecs": f"{describe(codecs)}: {name}", "chunk_kib": cr * 2 * d >> 10,
             "cores": len(os.sched_getaffinity(0)), "feature_mib": round(data.nbytes / 2**20, 1),
             "store_write_mbs": round(statistics.median(x[0] for x in v), 1),
             "store_write_cpu_mbs": round(statistics.median(x[1] for x in v), 1), "repeats": repeats}
            for name, v in runs.items()]


# --- sections --------------------------------------------------------------------------------------------------

def per_core(args: argparse.Namespace, work: Path, model: Path) -> list[dict]:
    """Run in a child pinned to one core: write/read MB/s and the trainer's StoreStream in label tokens/s."""
    torch.set_num_threads(1)
    from genrecal_cache.core.models import load_processor
    from genrecal_cache.data.render import Renderer
    from genrecal_train.data import StoreStream

    renderer = Renderer(load_processor(model))
    convs = conversations(model, args.conversations, tuple(args.answer_tokens), tuple(args.question_tokens),
                          args.seed)
    def stream(path: Path) -> tuple[float, float, int]:
        s = StoreStream(path, renderer, batch_size=args.batch_size, block_size=args.block_size)
        t, n = clock(), 0
        for batch, _ in s.batches(1):
            n += sum(len(x.teacher.targets) for x in batch)
        return *since(t), n

    trials = []
    for d in args.d:
        pool = feature_pool(d, args.data, args.seed)
        for qf in args.stream_question_features:
            recs = records(convs, pool, args.tokens, qf == "on", args.topk, args.seed)
            trials.append(Trial(recs, d, qf == "on", args.topk, args.commit_every, args.block_size,
                                store_format.codecs, store_format.CHUNK_BYTES >> 10, stream))
    run_trials(trials, work, args.repeats, lambda t: f"1 core d={t.d} question features {t.qf}")
    rows = [dict(t.row(), section="per-core", cores=1) for t in trials]
    if args.profile:
        t = max(trials, key=lambda t: (t.d, t.qf))
        profile(args, work, t.recs, t.d, t.qf, stream)
    return rows


def profile(args: argparse.Namespace, work: Path, recs: list[SampleRecord], d: int, qf: bool,
            stream: Callable[[Path], tuple[float, float, int]]) -> None:
    """Where one cold StoreStream pass spends its time: cProfile of the calling thread, plus the CPU time zarr's
    codec threads spend decoding (their sync decode wrapped, timed with time.thread_time)."""
    import cProfile
    import pstats

    from zarr.codecs import crc32c_, zstd

    spent: dict[str, float] = {}
    patches = [(zstd.ZstdCodec, "_decode_sync"), (crc32c_.Crc32cCodec, "_decode_sync")]
    origs = [(cls, name, getattr(cls, name)) for cls, name in patches]

    def timed(key: str, orig: Callable) -> Callable:
        def f(*a, **k):
            t = time.thread_time()
            try:
                return orig(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.thread_time() - t
        return f

    path = work / "profile-store"
    write_store(path, recs, meta_for(d, qf, args.topk), args.commit_every)
    drop_cache(path)
    for cls, name, orig in origs:
        setattr(cls, name, timed(f"{cls.__name__}.{name}", orig))
    prof = cProfile.Profile()
    prof.enable()
    wall, cpu, n = stream(path)
    prof.disable()
    for cls, name, orig in origs:
        setattr(cls, name, orig)
    buf = io.StringIO()
    buf.write(f"StoreStream, 1 core, d={d}, question features {qf}, cold: {wall:.3f} s wall, {cpu:.3f} s CPU, "
              f"{n} label tokens, {n / wall:.0f} label tokens/s ({n / cpu:.0f} per CPU-second)\n")
    for k, v in spent.items():
        buf.write(f"  CPU in zarr's codec threads, {k}: {v:.3f} s ({100 * v / cpu:.0f}% of the process's CPU)\n")
    buf.write("Main thread (cProfile; the codec threads' work shows as waiting in zarr's sync()):\n")
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    Path(args.profile).write_text(buf.getvalue())
    shutil.rmtree(path)


def object_store(url: str, recs: list[SampleRecord], d: int, args: argparse.Namespace, work: Path) -> dict:
    """The `object` section at one width: medians of --repeats of writing and reading the same samples locally and
    at `url` (a fresh prefix per repeat), MB/s of the feature bytes."""
    from genrecal_cache.core.locations import Location

    meta, order, mb = meta_for(d, args.question_features, args.topk), blocks(len(recs), args.block_size, 0), \
        feature_bytes(recs) / MB
    rates: dict[str, list[float]] = {}
    for r in range(args.repeats):
        here, there = work / f"object-{d}-{r}", f"{url.rstrip('/')}/bench-{d}-{r}-{os.getpid()}"
        first = (("local", here), ("object", there))[:: 1 if r % 2 == 0 else -1]  # alternating which goes first
        for kind, where in first:
            rates.setdefault(f"{kind}_write", []).append(mb / write_store(where, recs, meta, args.commit_every)[0])
        drop_cache(here)
        for kind, where in first:
            rates.setdefault(f"{kind}_read", []).append(mb / read_store(where, order)[0])
        shutil.rmtree(here)
        loc = Location.of(there)
        loc.fs.rm(loc.path, recursive=True)
        rates.setdefault("put", []).append(mb / raw_puts(Location.of(f"{there}-raw"), feature_bytes(recs)))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"section": "object", "d": d, "question_features": args.question_features, "samples": len(recs),
            "codecs": url.split("://")[0], "store_write_mbs": round(med["object_write"], 1),
            "plain_write_mbs": round(med["local_write"], 1), "store_read_mbs": round(med["object_read"], 1),
            "plain_read_mbs": round(med["local_read"], 1),
            "write_vs_plain": round(med["object_write"] / med["local_write"], 3),
            "read_vs_plain": round(med["object_read"] / med["local_read"], 3),
            "object_put_mbs": round(med["put"], 1)}


def raw_puts(loc, nbytes: int, size: int = 16 << 20, threads: int = 4) -> float:
    """Seconds to PUT `nbytes` of random bytes to `loc` as `size`-byte objects from `threads` threads (the store
    writer's shard size and pool), through obstore: what the server takes in with no store around it."""
    import obstore

    store, blob = loc.obstore(), os.urandom(size)
    t = time.perf_counter()
    with futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: obstore.put(store, f"raw-{i}", blob), range(max(1, nbytes // size))))
    dt = time.perf_counter() - t
    loc.fs.rm(loc.path, recursive=True)
    return dt * nbytes / (max(1, nbytes // size) * size)


@contextlib.contextmanager
def object_url(url: str | None, work: Path) -> Iterator[str | None]:
    """--url as given, or with `auto` a SeaweedFS on 127.0.0.1 for the run (its credentials in the environment)."""
    if url != "auto":
        yield url
        return
    from s3server import S3Server

    with S3Server(work / "s3server") as server:
        os.environ.update(server.env())
        yield server.url()


def summary(row: dict) -> str:
    return (f"write {row['store_write_mbs']:6.1f} MB/s (plain {row['plain_write_mbs']:6.1f}, "
            f"{row['write_vs_plain']:.2f}x; {row['store_write_cpu_mbs']:6.1f} per CPU-s, the codecs alone "
            f"{row['codec_encode_cpu_mbs']:6.1f})  read "
            f"{row['store_read_mbs']:6.1f} (plain {row['plain_read_mbs']:6.1f}, {row['read_vs_plain']:.2f}x; "
            f"{row['store_read_cpu_mbs']:6.1f} per CPU-s, warm {row['store_read_warm_mbs']:6.1f})  "
            f"compression {row['compression']:.3f} (all arrays {row['compression_all']:.3f})  write time: "
            + ", ".join(f"{k} {row[f'write_{k}_pct']}%" for k in StageClock.STEPS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[3584, 8192], help="feature widths (7B: 3584, 72B: 8192)")
    p.add_argument("--tokens", type=int, default=32768,
                   help="feature rows (label + question tokens) per configuration and width (default 32768: "
                        "512 MiB of bf16 at D=8192)")
    p.add_argument("--answer-tokens", type=int, nargs=2, default=[20, 200], metavar=("MIN", "MAX"))
    p.add_argument("--question-tokens", type=int, nargs=2, default=[100, 900], metavar=("MIN", "MAX"))
    p.add_argument("--no-question-features", dest="question_features", action="store_false",
                   help="main and sweep sections without question features (default: with, the heavy path)")
    p.add_argument("--stream-question-features", nargs="+", choices=["on", "off"], default=["on", "off"],
                   help="the per-core section's stores: with and/or without question features")
    p.add_argument("--topk", type=int, default=20, help="top-k stored per label token (cache-teacher's default)")
    p.add_argument("--commit-every", type=int, default=32, help="samples per commit")
    p.add_argument("--block-size", type=int, default=64, help="samples per read (StoreStream's default)")
    p.add_argument("--batch-size", type=int, default=8, help="StoreStream batch size")
    p.add_argument("--codecs", nargs="*", default=["zstd1", "zstd3", "zstd9", "shuffle+zstd1", "none"],
                   help="codec pipelines for the sweep (each + crc32c): zstdN, shuffle+zstdN, bitshuffle+zstdN, "
                        "shuffle+lz4, none, default")
    p.add_argument("--chunk-kib", type=int, nargs="*", default=[256, 1024, 4096],
                   help="minimum chunk sizes for the sweep (store_format.CHUNK_BYTES; 16 chunks per shard)")
    p.add_argument("--sections", nargs="+", choices=["main", "sweep", "encoder", "per-core", "object"],
                   default=["main", "sweep", "encoder", "per-core"], help="what to run (default: all but object, "
                   "which --url adds)")
    p.add_argument("--url", default=None, help="the object section's store: s3://bucket/prefix (credentials and "
                   "endpoint as for cache-teacher: AWS_* variables, profiles), or 'auto' for a SeaweedFS started "
                   "here for the run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", choices=["hidden", "normal"], default="hidden", help="synthetic features (above)")
    p.add_argument("--conversations", type=int, default=32, help="distinct rendered conversations, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder in $TMPDIR;"
                   " put it on the disk the store will live on)")
    p.add_argument("--profile", default=None, help="write a profile of the per-core StoreStream pass here")
    p.add_argument("--out", type=Path, default=None, help="CSV to write")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.url and "object" not in args.sections:
        args.sections.append("object")
    if "object" in args.sections and not args.url:
        p.error("--sections object needs --url s3://bucket/prefix (or --url auto)")
    for spec in args.codecs:
        try:
            parse_codecs(spec)
        except (argparse.ArgumentTypeError, ValueError):
            p.error(f"--codecs: unknown pipeline {spec!r} (zstdN, shuffle+zstdN, bitshuffle+zstdN, shuffle+lz4, "
                    "none, default)")

    if args._child:  # the per-core section, in a process pinned to one core
        work = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-store-core-"))
        try:
            Path(args._child).write_text(json.dumps(per_core(args, work, Path(args._model))))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return

    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-store-"))
    rows: list[dict] = []
    try:
        from tiny_zoo import build_model

        with contextlib.redirect_stdout(sys.stderr):
            model = build_model("qwen2vl", work / "qwen2vl", seed=0)
        convs = conversations(model, args.conversations, tuple(args.answer_tokens), tuple(args.question_tokens),
                              args.seed)
        qf = args.question_features
        chunk0 = store_format.CHUNK_BYTES >> 10
        configs: list[tuple[str, int, str, int]] = []
        if "main" in args.sections:
            configs += [("main", d, "default", chunk0) for d in args.d]
        if "sweep" in args.sections:
            dmax = max(args.d)
            configs += [("codec", dmax, c, chunk0) for c in args.codecs]
            configs += [("chunk", dmax, "default", k) for k in args.chunk_kib]
        pools: dict[int, list[SampleRecord]] = {}
        trials: dict[tuple[int, str, int], Trial] = {}  # one per distinct (width, codecs, chunk size)
        for section, d, spec, kib in configs:
            make = parse_codecs(spec)
            key = (d, describe(make()), kib)
            if key not in trials:
                if d not in pools:
                    pools[d] = records(convs, feature_pool(d, args.data, args.seed), args.tokens, qf, args.topk,
                                       args.seed)
                trials[key] = Trial(pools[d], d, qf, args.topk, args.commit_every, args.block_size, make, kib)
        run_trials(list(trials.values()), work, args.repeats,
                   lambda t: f"d={t.d} {describe(t.codecs())} {t.chunk_kib} KiB")
        cores = len(os.sched_getaffinity(0))
        done = {key: dict(t.row(), cores=cores) for key, t in trials.items()}
        for section, d, spec, kib in configs:  # a configuration in two sections is reported in both, run once
            key = (d, describe(parse_codecs(spec)()), kib)
            rows.append(dict(done[key], section=section))
            print(f"{section:5s} d={d} {key[1]:20s} {kib:4d} KiB  " + summary(rows[-1]), flush=True)
        pools.clear()
        trials.clear()
        if "encoder" in args.sections:
            for d in args.d:
                data = feature_pool(d, args.data, args.seed).view(torch.uint16).numpy()
                data = np.concatenate([data] * -(-(args.tokens) // len(data)))[: args.tokens]
                for row in encoder(d, data, work, args.repeats):
                    rows.append(row)
                    print(f"encoder d={d} {row['codecs']:60s} {row['store_write_mbs']:6.1f} MB/s, "
                          f"{row['store_write_cpu_mbs']:6.1f} per CPU-s", flush=True)
        if "object" in args.sections:
            with object_url(args.url, work) as url:
                for d in args.d:
                    recs = records(convs, feature_pool(d, args.data, args.seed), args.tokens, qf, args.topk,
                                   args.seed)
                    rows.append(object_store(url, recs, d, args, work))
                    row = rows[-1]
                    print(f"object d={d} {url}: write {row['store_write_mbs']:6.1f} MB/s (local "
                          f"{row['plain_write_mbs']:6.1f}, {row['write_vs_plain']:.2f}x)  read "
                          f"{row['store_read_mbs']:6.1f} (local {row['plain_read_mbs']:6.1f}, "
                          f"{row['read_vs_plain']:.2f}x)  the server's own rate, 16 MiB PUTs from 4 threads: "
                          f"{row['object_put_mbs']:6.1f}", flush=True)
        if "per-core" in args.sections:
            out = work / "per-core.json"
            cpu = max(os.sched_getaffinity(0))
            cmd = [sys.executable, __file__, "--_child", str(out), "--_model", str(model), *sys.argv[1:]]
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            subprocess.run(cmd, check=True, env=env, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
            for row in json.loads(out.read_text()):
                rows.append(row)
                print(f"1 core d={row['d']} question features {'on ' if row['question_features'] else 'off'}  "
                      + summary(row) + f"\n       StoreStream {row['stream_label_tok_s']:.0f} label tok/s "
                      f"({row['stream_label_tok_cpu_s']:.0f} per CPU-s; {row['stream_mbs']:.1f} MB/s of features); "
                      "store read alone "
                      f"{row['read_label_tok_s']:.0f} ({row['read_label_tok_cpu_s']:.0f} per CPU-s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for row in rows:
                w.writerow({k: row.get(k, "") for k in FIELDS})


if __name__ == "__main__":
    main()
