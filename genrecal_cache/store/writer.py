"""The write side of a teacher store: create it (attributes, head, tokenizer) and append to one part, committing
atomically (array data written and made durable, then the commit's Parquet file put into place last) on a writer
thread, in a local folder or on an object store (`part_files.py`).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import zarr

from genrecal_cache.core.durable import fsync, fsync_tree
from genrecal_cache.core.errors import StoreError
from genrecal_cache.core.faults import fault_point
from genrecal_cache.core.locations import Location

from .dtypes import to_storage
from .files import server_failure
from .format import (
    ARRAY_CONFIG,
    ATTR,
    REJECT_KINDS,
    REJECT_SCHEMA,
    REJECTS_DIR,
    SAMPLE_SCHEMA,
    SAMPLES_DIR,
    TOKENIZER_DIR,
    ArraySpec,
    check_compatible,
    codecs,
    finished,
    part_arrays,
    read_meta,
)
from .part_files import LocalPartFiles, ObjectPartFiles, creation_lock, part_files, save_tokenizer
from .record import NonFiniteError, SampleRecord, non_finite
from .shards import Rows, ShardEncoder, StageClock

# --- the store's root -----------------------------------------------------------------------------------------

def _write_matrix(group: zarr.Group, name: str, value: torch.Tensor, dtype: str) -> None:
    data = to_storage(value, dtype)
    spec = ArraySpec(name, "", data.shape[1] if data.ndim == 2 else None, str(data.dtype))
    arr = group.create_array(name, shape=data.shape, chunks=spec.shape(spec.chunk_rows), dtype=data.dtype,
                             compressors=codecs(), fill_value=0, overwrite=True, config=ARRAY_CONFIG)
    arr[...] = data


def open_or_create(path: Path | Location, meta: dict[str, Any], head: dict[str, torch.Tensor],
                   tokenizer: Any = None) -> dict[str, Any]:
    """Create the store (attributes, teacher head and tokenizer) or check that the existing one is compatible
    with `meta`. Returns the store's attributes. `path` a local folder or a `Location`; `head` holds "weight"
    (V, D), optionally "embed" (V, D) and "bias" (V,)."""
    loc = Location.of(path)
    with creation_lock(loc):
        if finished(loc):
            existing = read_meta(loc)
            check_compatible(existing, meta, loc)
            return existing
        # A new store, or one whose creation was killed before its attributes were written: (re)create the
        # head in place. mode="a" never clears the directory (the lock file lives there).
        root = zarr.open_group(store=loc.zarr_store(), mode="a", zarr_format=3)
        hg = root.require_group("head")
        hd = meta["head"]["dtype"]
        for name, value in head.items():
            _write_matrix(hg, name, value, hd)
        if tokenizer is not None:
            save_tokenizer(tokenizer, loc.join(TOKENIZER_DIR))
        if loc.is_local:
            for folder in (Path(loc.path, "head"), Path(loc.path, TOKENIZER_DIR)):
                if folder.exists():
                    fsync_tree(folder)  # before the attributes that declare them complete
        root.attrs[ATTR] = meta  # last, and durable: attributes present means the head is complete
        if loc.is_local:
            fsync(Path(loc.path, "zarr.json"))
            fsync(Path(loc.path))
        return meta



# --- a writer's part ------------------------------------------------------------------------------------------

@dataclass
class _Commit:
    """What one `commit()` hands the writer thread: the rows added since the previous one."""

    seq: int
    rows_end: int
    lengths: dict[str, int]  # each unit's length once it is written
    samples: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    rows: dict[str, list[np.ndarray]]  # per array, each sample's rows


class PartWriter:
    """Appends samples to one part; `commit()` hands everything added so far to the writer thread, which makes it
    durable and visible (commits in order, one at a time), while the job goes on; `wait()` returns once all are.

    On open it recovers: uncommitted files are deleted and arrays are cut back to the last commit. `seq`,
    `rows_end` and `lengths` count the commits handed over; `durable` is (seq, rows_end) of the last one written.
    A commit that fails stops the writer: the error is raised by the job's next `add`, `commit` or `wait`, and no
    later commit is written."""

    QUEUE = 1  # commits waiting behind the one being written; `commit()` blocks beyond that (bounded memory)
    SHARD_THREADS = 4  # a commit's shards encoded and written at once (overlapping compression and the disk)

    def __init__(self, root: Path | Location, part: str, meta: dict[str, Any], provenance: dict[str, Any],
                 files: LocalPartFiles | ObjectPartFiles | None = None):
        """`files`: where the part's files go (`part_files.part_files`, with the lease's options on an object
        store); by default as `root` says."""
        loc = Location.of(root)
        self.root, self.meta = loc, meta
        self.files = files or part_files(loc, part)
        self.specs = part_arrays(meta)
        self.files.acquire()  # held while this writer lives: the part's flock, or its lease
        try:
            self._open(loc, part, provenance)
        except BaseException:
            self.files.release()
            raise

    def _open(self, loc: Location, part: str, provenance: dict[str, Any]) -> None:
        group = zarr.open_group(store=loc.zarr_store(), mode="a", zarr_format=3)
        pg = group.require_group(f"parts/{part}")
        pg.attrs["provenance"] = [*pg.attrs.get("provenance", []), provenance]
        self.arrays: dict[str, zarr.Array] = {}
        for spec in self.specs:
            if spec.name in pg:
                self.arrays[spec.name] = pg[spec.name].with_config(ARRAY_CONFIG)
            else:
                self.arrays[spec.name] = pg.create_array(
                    spec.name, shape=spec.shape(0), chunks=spec.shape(spec.chunk_rows),
                    shards=spec.shape(spec.shard_rows), dtype=spec.dtype, compressors=codecs(), fill_value=0,
                    config=ARRAY_CONFIG)
        self.files.prepare((SAMPLES_DIR, REJECTS_DIR))
        self.seq, self.rows_end, self.lengths = self._recover()
        self.rows_total: int | None = None  # the manifest's rows (of every shard), recorded with each commit
        # In-memory tail of each array from its last shard boundary, rewritten whole at every commit.
        self.tail: dict[str, np.ndarray] = {}
        for spec in self.specs:
            n = self.lengths[spec.unit]
            start = n - n % spec.shard_rows
            self.tail[spec.name] = self.arrays[spec.name][start:n] if n > start else np.zeros(
                spec.shape(0), spec.dtype)
        self._pending: list[dict[str, Any]] = []
        self._pending_rejects: list[dict[str, Any]] = []
        self._pending_rows: dict[str, list[np.ndarray]] = {s.name: [] for s in self.specs}
        self._pending_lengths = dict(self.lengths)
        self.encoders = {spec.name: ShardEncoder.of(self.arrays[spec.name]) for spec in self.specs}
        self.clock = StageClock()  # the writer thread's time per step
        self.durable = (self.seq - 1, self.rows_end)  # the writer thread's: the last commit on disk
        self._written = dict(self.lengths)  # the writer thread's: lengths on disk
        self._queue: queue.Queue[_Commit | None] = queue.Queue(self.QUEUE)
        self._error: BaseException | None = None
        self._shards = futures.ThreadPoolExecutor(self.SHARD_THREADS, thread_name_prefix=f"genrecal-shards-{part}")
        self._thread = threading.Thread(target=self._write_commits, name=f"genrecal-writer-{part}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write the commits handed over, then release the part (its lock); what was not committed is dropped by
        the next writer's recovery. Raises nothing: a failed commit's error is raised by `wait()`."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            self._shards.shutdown()
        self.files.release()

    def wait(self) -> None:
        """Block until every commit handed over is durable; raises the error of one that failed."""
        self._queue.join()
        self._raise_failed()

    def _raise_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _recover(self) -> tuple[int, int, dict[str, int]]:
        seq, rows_end, lengths = 0, 0, {"tokens": 0, "labels": 0, "question": 0}
        last = self.files.last_commit(SAMPLES_DIR)
        if last is not None:
            seq, rows_end, lengths = last["seq"] + 1, last["rows_end"], last["lengths"]
        self.files.clean((SAMPLES_DIR, REJECTS_DIR), seq)  # the tail of a crashed commit
        for spec in self.specs:
            arr = self.arrays[spec.name]
            if arr.shape[0] < lengths[spec.unit]:
                raise StoreError(f"{self.files.dir}/{spec.name} has {arr.shape[0]} rows but the last commit says "
                                 f"{lengths[spec.unit]}: the store is damaged; run `inspect-cache --verify`")
            if arr.shape[0] > lengths[spec.unit]:  # the uncommitted tail of a crashed commit
                arr.resize(spec.shape(lengths[spec.unit]))
        return seq, rows_end, lengths

    @property
    def num_pending(self) -> int:
        return len(self._pending) + len(self._pending_rejects)

    def add(self, rec: SampleRecord, keep_image_bytes: bool = True) -> None:
        """Buffer one sample; raises `NonFiniteError` (adding nothing) when any of its values is NaN or inf."""
        self._raise_failed()
        rows = rec.rows(self.meta)
        bad = non_finite(rows)
        if bad is not None:
            raise NonFiniteError(f"non-finite teacher values: {bad}")
        n_tok, n_lab = len(rows["token_ids"]), len(rows["targets"])
        n_q = len(rows["question_features"]) if "question_features" in rows else 0
        assert rows["label_mask"].sum() == n_lab == len(rows["features"]), "label mask, targets, features disagree"
        for spec in self.specs:
            assert rows[spec.name].shape[1:] == spec.shape(0)[1:], f"{spec.name}: bad row shape"
            self._pending_rows[spec.name].append(rows[spec.name])
        lens = self._pending_lengths
        self._pending.append({
            "sample_id": rec.sample_id,
            "source_row": rec.source_row,
            "messages": json.dumps(rec.messages, ensure_ascii=False),
            # By reference, an image keeps its path + digest; one with no path (inline) keeps its bytes.
            "images": [im.data if keep_image_bytes or im.path is None else None for im in rec.images],
            "image_paths": [im.path or "" for im in rec.images],
            "image_digests": [im.digest for im in rec.images],
            "token_start": lens["tokens"], "num_tokens": n_tok,
            "label_start": lens["labels"], "num_labels": n_lab,
            "question_start": lens["question"], "num_question": n_q,
            "segments": json.dumps(rec.segments),
            "answers_generated": rec.answers_generated,
            "answer_truncated": rec.answer_truncated,
            "has_question_features": rec.carries_question(self.meta),
        })
        lens["tokens"] += n_tok
        lens["labels"] += n_lab
        lens["question"] += n_q

    def reject(self, source_row: int, sample_id: str, reason: str, retryable: bool = False) -> None:
        """Buffer a reject; `retryable` when the teacher failed on the row rather than its content (`--retry-rejects`
        runs those again)."""
        self._pending_rejects.append({"source_row": source_row, "sample_id": sample_id, "reason": reason,
                                      "retryable": retryable})

    def drop_from(self, row: int) -> None:
        """Forget what was buffered for manifest rows >= `row` (the job stopped before finishing them; the next run
        does them again). Samples are added in row order, so those dropped are the last ones."""
        n = sum(1 for s in self._pending if s["source_row"] < row)
        assert all(s["source_row"] >= row for s in self._pending[n:]), "samples not added in row order"
        self._pending = self._pending[:n]
        self._pending_rows = {k: v[:n] for k, v in self._pending_rows.items()}
        self._pending_rejects = [r for r in self._pending_rejects if r["source_row"] < row]
        self._pending_lengths = {u: self.lengths[u] + sum(s[f"num_{c}"] for s in self._pending)
                                 for u, c in (("tokens", "tokens"), ("labels", "labels"), ("question", "question"))}

    def commit(self, rows_end: int) -> None:
        """Hand everything added so far to the writer thread; `rows_end` is the manifest row to resume from once it
        is durable. Blocks while `QUEUE` commits wait already."""
        self._raise_failed()
        c = _Commit(self.seq, rows_end, dict(self._pending_lengths), self._pending, self._pending_rejects,
                    self._pending_rows)
        self._queue.put(c)
        fault_point(f"commit-queued:{c.seq}")
        self.seq, self.rows_end, self.lengths = self.seq + 1, rows_end, dict(c.lengths)
        self._pending, self._pending_rejects = [], []
        self._pending_rows = {s.name: [] for s in self.specs}

    def _put_shard(self, encoder: ShardEncoder, spec: ArraySpec, rows: Rows, start: int, end: int,
                   point: str) -> None:
        """Rows start..end encoded as one shard and written (a pool thread: zstd, the file calls and the PUTs
        release the GIL)."""
        fault_point(point)
        with self.clock("encode"):
            blob = encoder.encode(rows.take(start, end))
        with self.clock("write"):
            self.files.put_shard(spec.name, start // spec.shard_rows, spec.width is not None, blob)

    def _write_commits(self) -> None:
        """The writer thread: write each commit in order; after a failure only drain the queue."""
        while True:
            c = self._queue.get()
            try:
                if c is None:
                    return
                if self._error is None:
                    self._write(c)
            except BaseException as e:  # noqa: BLE001 - handed to the job's thread, raised there
                self._error = server_failure(self.root, e, f"writing commit {c.seq}") or e
            finally:
                self._queue.task_done()

    def _write(self, c: _Commit) -> None:
        """Make one commit durable: whole shards of each array written and synced, then its rejects table, then
        its samples table (the commit record, put into place last)."""
        shards: list[futures.Future] = []
        synced: list[tuple[ArraySpec, list[int]]] = []  # each array's shards, made durable once
        for spec in self.specs:
            old_n, new_n = self._written[spec.unit], c.lengths[spec.unit]
            if new_n == old_n:
                continue
            arr = self.arrays[spec.name]
            rows = Rows([self.tail[spec.name], *c.rows[spec.name]], old_n - len(self.tail[spec.name]))
            assert rows.start % spec.shard_rows == 0 and rows.end == new_n
            with self.clock("zarr"):
                arr.resize(spec.shape(new_n))
            encoder, written = self.encoders[spec.name], []
            for s in range(rows.start, new_n, spec.shard_rows):  # whole shards, never two writes into one
                e = min(s + spec.shard_rows, new_n)
                written.append(s // spec.shard_rows)
                if encoder is not None:  # encoded and written by the pool, all shards of the commit at once
                    shards.append(self._shards.submit(self._put_shard, encoder, spec, rows, s, e,
                                                      f"array-write:{c.seq}:{spec.name}"))
                    continue
                fault_point(f"array-write:{c.seq}:{spec.name}")  # codecs not encoded here: zarr writes the shard
                with self.clock("zarr"):
                    arr[s:e] = rows.take(s, e)
                with self.clock("fsync"):
                    self.files.sync_shard(spec.name, s // spec.shard_rows, spec.width is not None)
            synced.append((spec, written))
            with self.clock("copy"):  # a copy, not a view: it would keep the commit's rows
                self.tail[spec.name] = np.array(rows.take(new_n - new_n % spec.shard_rows, new_n))
        with self.clock("shards"):  # the pool's shards, each written and fsynced; the first error is raised
            futures.wait(shards)
            for f in shards:
                f.result()
        with self.clock("fsync"):
            for spec, written in synced:
                self.files.sync(spec.name, written, spec.width is not None)
        name = f"{c.seq:08d}.parquet"
        commit = {"seq": c.seq, "rows_end": c.rows_end, "lengths": dict(c.lengths), "time": round(time.time(), 3),
                  "rows_total": self.rows_total}  # time and rows_total: for inspect-cache --progress
        fault_point(f"arrays-written:{c.seq}")
        kinds = {REJECT_KINDS: json.dumps({"retryable": [r["retryable"] for r in c.rejects]})}
        with self.clock("table"):
            self.files.put_table(REJECTS_DIR, name, _table(c.rejects, REJECT_SCHEMA, commit, kinds), False)
        fault_point(f"rejects-written:{c.seq}")
        with self.clock("table"):  # the commit point
            self.files.put_table(SAMPLES_DIR, name, _table(c.samples, SAMPLE_SCHEMA, commit), True)
        fault_point(f"committed:{c.seq}")
        self._written = dict(c.lengths)
        self.durable = (c.seq, c.rows_end)


def _table(rows: list[dict], schema: pa.Schema, commit: dict, metadata: dict[str, str] | None = None) -> pa.Table:
    """A commit's table, the commit record in its schema metadata."""
    return pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
        {"genrecal_commit": json.dumps(commit), **(metadata or {})})
