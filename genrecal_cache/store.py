"""The teacher store: a Zarr v3 group that holds everything distillation needs (DESIGN.md, "The teacher store").

Writers append to their own part (flat token-axis arrays + Parquet tables) and commit atomically: array data
written and fsynced, then the commit's Parquet file renamed into place. The reader sees committed samples only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from . import FORMAT_VERSION
from .errors import IncompatibleStoreError, StoreError, StoreNotFoundError
from .faults import fault_point

ATTR = "genrecal"
CHUNK_BYTES = 1 << 20  # chunks of at least 1 MiB (DESIGN.md)
CHUNKS_PER_SHARD = 16
FEATURE_DTYPES = ("bfloat16", "float16", "float32")
_SAMPLES, _REJECTS = "samples", "rejects"
TOKENIZER_DIR = "teacher_tokenizer"  # the teacher tokenizer, so a store decodes its own tokens

SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("source_row", pa.int64()),
    ("messages", pa.string()),  # JSON, transformers messages format
    ("images", pa.list_(pa.binary())),  # encoded bytes; null where kept by reference (--image-refs)
    ("image_paths", pa.list_(pa.string())),
    ("image_digests", pa.list_(pa.string())),  # sha256 of the encoded bytes
    ("token_start", pa.int64()),
    ("num_tokens", pa.int64()),
    ("label_start", pa.int64()),
    ("num_labels", pa.int64()),
    ("question_start", pa.int64()),
    ("num_question", pa.int64()),
    ("segments", pa.string()),  # JSON list of {turn, role, start, end, answer_start}
    ("answers_generated", pa.bool_()),
])
REJECT_SCHEMA = pa.schema([("source_row", pa.int64()), ("sample_id", pa.string()), ("reason", pa.string())])


# --- dtypes -------------------------------------------------------------------------------------------------

def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array the store keeps: bf16 as its uint16 bits (Zarr has no bfloat16)."""
    x = x.detach().to("cpu", getattr(torch, dtype)).contiguous()
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `to_storage` (no copy for bf16)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _np_dtype(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


# --- array layout -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArraySpec:
    """One token-axis array of a part: `rows` grows by `unit` ("tokens", "labels" or "question")."""

    name: str
    unit: str
    width: int | None  # None for 1-D arrays
    dtype: str  # numpy dtype name as stored

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * (self.width or 1)

    @property
    def chunk_rows(self) -> int:
        return max(1, 2 ** math.ceil(math.log2(math.ceil(CHUNK_BYTES / self.row_bytes))))

    @property
    def shard_rows(self) -> int:
        return self.chunk_rows * CHUNKS_PER_SHARD

    def shape(self, rows: int) -> tuple[int, ...]:
        return (rows,) if self.width is None else (rows, self.width)


def part_arrays(meta: dict[str, Any]) -> list[ArraySpec]:
    """The arrays every part of a store with these attributes holds."""
    d, k, fd = meta["teacher"]["hidden_size"], meta["topk"], _np_dtype(meta["feature_dtype"])
    specs = [
        ArraySpec("token_ids", "tokens", None, "int32"),
        ArraySpec("label_mask", "tokens", None, "uint8"),
        ArraySpec("features", "labels", d, fd),
        ArraySpec("targets", "labels", None, "int32"),
    ]
    if k:
        specs += [ArraySpec("topk_ids", "labels", k, "int32"), ArraySpec("topk_logprobs", "labels", k, "float32")]
    if meta["question_features"]:
        specs.append(ArraySpec("question_features", "question", d, fd))
    specs += [ArraySpec(f"layers/{layer}", "labels", d, fd) for layer in meta.get("layers", [])]
    return specs


# Write all-zero chunks too: then a shard file that is missing is damage, never silently "all zeros".
_ARRAY_CONFIG = {"write_empty_chunks": True}


def shard_file(array_dir: Path, shard: int, two_d: bool) -> Path:
    """Where zarr keeps shard `shard` of an array (default chunk key encoding, "/" separator)."""
    return array_dir / "c" / str(shard) / "0" if two_d else array_dir / "c" / str(shard)


def _codecs() -> list:
    return [ZstdCodec(level=3), Crc32cCodec()]


# --- what a writer appends ------------------------------------------------------------------------------------

@dataclass
class SampleRecord:
    """One teacher-forced sample ready to append: token-axis arrays plus its table row."""

    sample_id: str
    source_row: int
    messages: list[dict]
    images: list[Any]  # dataset.ImageRef
    token_ids: np.ndarray  # (L,) int
    label_mask: np.ndarray  # (L,) bool
    features: torch.Tensor  # (A, D) at the label positions
    targets: np.ndarray  # (A,)
    segments: list[dict]
    topk_ids: torch.Tensor | None = None  # (A, K)
    topk_logprobs: torch.Tensor | None = None  # (A, K)
    question_features: torch.Tensor | None = None  # (P, D) at every other position
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (A, D)
    answers_generated: bool = False

    def rows(self, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        fd = meta["feature_dtype"]
        out = {
            "token_ids": np.asarray(self.token_ids, dtype=np.int32),
            "label_mask": np.asarray(self.label_mask, dtype=np.uint8),
            "features": to_storage(self.features, fd),
            "targets": np.asarray(self.targets, dtype=np.int32),
        }
        if meta["topk"]:
            out["topk_ids"] = self.topk_ids.to(torch.int32).numpy()
            out["topk_logprobs"] = self.topk_logprobs.to(torch.float32).numpy()
        if meta["question_features"]:
            out["question_features"] = to_storage(self.question_features, fd)
        for layer in meta.get("layers", []):
            out[f"layers/{layer}"] = to_storage(self.layers[layer], fd)
        return out


# --- the store's root -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the store's root, so concurrent writers create and check it one at a time."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_matrix(group: zarr.Group, name: str, value: torch.Tensor, dtype: str) -> None:
    data = to_storage(value, dtype)
    spec = ArraySpec(name, "", data.shape[1] if data.ndim == 2 else None, str(data.dtype))
    arr = group.create_array(name, shape=data.shape, chunks=spec.shape(spec.chunk_rows), dtype=data.dtype,
                             compressors=_codecs(), fill_value=0, overwrite=True, config=_ARRAY_CONFIG)
    arr[...] = data


def open_or_create(path: Path, meta: dict[str, Any], head: dict[str, torch.Tensor], tokenizer: Any = None
                   ) -> dict[str, Any]:
    """Create the store (attributes, teacher head and tokenizer) or check that the existing one is compatible
    with `meta`. Returns the store's attributes. `head` holds "weight" (V, D), optionally "embed" (V, D) and
    "bias" (V,)."""
    with _locked(path):
        if _finished(path):
            existing = read_meta(path)
            _check_compatible(existing, meta, path)
            return existing
        # A new store, or one whose creation was killed before its attributes were written: (re)create the
        # head in place. mode="a" never clears the directory (the lock file lives there).
        root = zarr.open_group(str(path), mode="a", zarr_format=3)
        hg = root.require_group("head")
        hd = meta["head"]["dtype"]
        for name, value in head.items():
            _write_matrix(hg, name, value, hd)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        root.attrs[ATTR] = meta  # last: attributes present means the head is complete
        return meta


def _finished(path: Path) -> bool:
    """Whether a store's creation completed (its attributes are written last)."""
    try:
        return ATTR in json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def read_meta(path: Path) -> dict[str, Any]:
    if not (path / "zarr.json").exists():
        raise StoreNotFoundError(f"no teacher store at {path} (create one with `cache-teacher --output {path}`)")
    attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    if ATTR not in attrs:
        raise StoreError(f"{path} is a Zarr group but not a finished GenRecal store (no '{ATTR}' attributes); "
                         "re-run the cache-teacher command that created it")
    meta = attrs[ATTR]
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path} has store format {meta.get('format_version')}, this GenRecal reads "
                         f"{FORMAT_VERSION}; use the GenRecal version that wrote it")
    return meta


# What must match for a job to add to an existing store.
_IDENTITY = ("architecture", "hidden_size", "vocab_size", "config_digest", "tokenizer_digest",
             "chat_template_digest", "head_digest")
_SETTINGS = ("dtype", "feature_dtype", "topk", "question_features", "layers", "max_length", "num_shards",
             "answers", "generation", "manifest_digest")


def check_settings(path: Path, settings: dict[str, Any]) -> None:
    """Raise if a finished store at `path` was written with other settings (no-op when there is none)."""
    if not _finished(path):
        return
    existing = read_meta(path)
    for key in _SETTINGS:
        a, b = existing.get(key), settings.get(key)
        if a != b:
            raise IncompatibleStoreError(
                f"{path} was written with {key}={_short(a)}, this run asks for {_short(b)}; re-run with the "
                "store's setting or write to a new --output")


def _check_compatible(existing: dict, meta: dict, path: Path) -> None:
    # Settings first: another --dtype also changes the head's digest, and the setting is the real cause.
    check_settings(path, meta)
    for key in _IDENTITY:
        a, b = existing["teacher"].get(key), meta["teacher"].get(key)
        if a != b:
            raise IncompatibleStoreError(
                f"{path} was written by another teacher ({key}: {_short(a)} in the store, {_short(b)} now; store "
                f"teacher {existing['teacher'].get('name_or_path')!r}); write to a new --output or pass that teacher")


def _short(value: Any) -> str:
    text = repr(value)
    return text[:14] + "…'" if isinstance(value, str) and len(value) == 64 else text


# --- a writer's part ------------------------------------------------------------------------------------------

def _read_commit(file: Path) -> dict[str, Any]:
    md = pq.read_schema(file).metadata or {}
    return json.loads(md[b"genrecal_commit"])


class PartWriter:
    """Appends samples to one part; `commit()` makes everything added so far durable and visible.

    On open it recovers: uncommitted files are deleted and arrays are cut back to the last commit."""

    def __init__(self, root: Path, part: str, meta: dict[str, Any], provenance: dict[str, Any]):
        self.root, self.meta, self.dir = root, meta, root / "parts" / part
        self.specs = part_arrays(meta)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / ".lock", "a")  # held while this writer lives
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another cache-teacher is writing part {part} of {root}; wait for it, or give "
                             "this job another --shard") from None
        group = zarr.open_group(str(root), mode="a", zarr_format=3)
        pg = group.require_group(f"parts/{part}")
        pg.attrs["provenance"] = [*pg.attrs.get("provenance", []), provenance]
        self.arrays: dict[str, zarr.Array] = {}
        for spec in self.specs:
            if spec.name in pg:
                self.arrays[spec.name] = pg[spec.name].with_config(_ARRAY_CONFIG)
            else:
                self.arrays[spec.name] = pg.create_array(
                    spec.name, shape=spec.shape(0), chunks=spec.shape(spec.chunk_rows),
                    shards=spec.shape(spec.shard_rows), dtype=spec.dtype, compressors=_codecs(), fill_value=0,
                    config=_ARRAY_CONFIG)
        for sub in (_SAMPLES, _REJECTS):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.seq, self.rows_end, self.lengths = self._recover()
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

    def _recover(self) -> tuple[int, int, dict[str, int]]:
        commits = sorted((self.dir / _SAMPLES).glob("*.parquet"))
        seq, rows_end, lengths = 0, 0, {"tokens": 0, "labels": 0, "question": 0}
        if commits:
            last = _read_commit(commits[-1])
            seq, rows_end, lengths = last["seq"] + 1, last["rows_end"], last["lengths"]
        for sub in (_SAMPLES, _REJECTS):  # the tail of a crashed commit
            for f in (self.dir / sub).iterdir():
                if f.suffix != ".parquet" or int(f.stem) >= seq:
                    f.unlink()
        for spec in self.specs:
            arr = self.arrays[spec.name]
            if arr.shape[0] < lengths[spec.unit]:
                raise StoreError(f"{self.dir / spec.name} has {arr.shape[0]} rows but the last commit says "
                                 f"{lengths[spec.unit]}: the store is damaged; run `inspect-cache --verify`")
            if arr.shape[0] > lengths[spec.unit]:  # the uncommitted tail of a crashed commit
                arr.resize(spec.shape(lengths[spec.unit]))
        return seq, rows_end, lengths

    @property
    def num_pending(self) -> int:
        return len(self._pending) + len(self._pending_rejects)

    @property
    def pending_bytes(self) -> int:
        return sum(r.nbytes for rows in self._pending_rows.values() for r in rows)

    def add(self, rec: SampleRecord, keep_image_bytes: bool = True) -> None:
        rows = rec.rows(self.meta)
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
        })
        lens["tokens"] += n_tok
        lens["labels"] += n_lab
        lens["question"] += n_q

    def reject(self, source_row: int, sample_id: str, reason: str) -> None:
        self._pending_rejects.append({"source_row": source_row, "sample_id": sample_id, "reason": reason})

    def commit(self, rows_end: int) -> None:
        """Make everything added so far durable; `rows_end` is the manifest row to resume from."""
        new = self._pending_lengths
        for spec in self.specs:
            old_n, new_n = self.lengths[spec.unit], new[spec.unit]
            if new_n == old_n:
                continue
            arr = self.arrays[spec.name]
            data = np.concatenate([self.tail[spec.name], *self._pending_rows[spec.name]])
            start = old_n - len(self.tail[spec.name])
            assert start % spec.shard_rows == 0 and start + len(data) == new_n
            arr.resize(spec.shape(new_n))
            for s in range(start, new_n, spec.shard_rows):  # whole shards, never two writes into one
                e = min(s + spec.shard_rows, new_n)
                fault_point(f"array-write:{self.seq}:{spec.name}")
                arr[s:e] = data[s - start : e - start]
                _fsync_shard(self.dir / spec.name, s // spec.shard_rows, spec.width is not None)
            keep = new_n - new_n % spec.shard_rows
            self.tail[spec.name] = data[keep - start :]
            _fsync(self.dir / spec.name / "zarr.json")
            _fsync(self.dir / spec.name)
        name = f"{self.seq:08d}.parquet"
        commit = {"seq": self.seq, "rows_end": rows_end, "lengths": dict(new)}
        fault_point(f"arrays-written:{self.seq}")
        _write_table(self.dir / _REJECTS / name, self._pending_rejects, REJECT_SCHEMA, commit)
        fault_point(f"rejects-written:{self.seq}")
        _write_table(self.dir / _SAMPLES / name, self._pending, SAMPLE_SCHEMA, commit)  # the commit point
        fault_point(f"committed:{self.seq}")
        self.seq, self.rows_end, self.lengths = self.seq + 1, rows_end, dict(new)
        self._pending, self._pending_rejects = [], []
        self._pending_rows = {s.name: [] for s in self.specs}


def _fsync_shard(array_dir: Path, shard: int, two_d: bool) -> None:
    """zarr renames each shard file into place; fsync its data, the rename and any new directory."""
    f = shard_file(array_dir, shard, two_d)
    _fsync(f)
    for d in (f.parent, f.parent.parent, array_dir):
        _fsync(d)


def _write_table(path: Path, rows: list[dict], schema: pa.Schema, commit: dict) -> None:
    """Write a Parquet file atomically: temp file, fsync, rename, fsync the directory."""
    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
        {"genrecal_commit": json.dumps(commit)})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, compression="zstd")
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


# --- the reader -----------------------------------------------------------------------------------------------

@dataclass
class TeacherSample:
    """Everything the trainer needs of one sample; tensors in the store's dtype on CPU."""

    sample_id: str
    source_row: int
    part: str
    messages: list[dict]
    images: list[bytes | None]  # None: read it from image_paths (stores written with --image-refs)
    image_paths: list[str]
    segments: list[dict]
    token_ids: torch.Tensor  # (L,) int64, teacher tokenization, image placeholders expanded
    label_mask: torch.Tensor  # (L,) bool
    features: torch.Tensor  # (A, D) teacher final features at the label positions
    targets: torch.Tensor  # (A,) int64
    topk_ids: torch.Tensor | None  # (A, K)
    topk_logprobs: torch.Tensor | None  # (A, K)
    question_features: torch.Tensor | None  # (P, D), at every position not a label position
    layers: dict[int, torch.Tensor]  # layer -> (A, D)
    answers_generated: bool

    @property
    def label_positions(self) -> torch.Tensor:  # (A,)
        return self.label_mask.nonzero().squeeze(1)


class Part:
    """One writer's committed samples: its arrays and its Parquet tables."""

    def __init__(self, root: Path, name: str, meta: dict[str, Any]):
        self.name, self.dir, self.meta = name, root / "parts" / name, meta
        self.specs = {s.name: s for s in part_arrays(meta)}
        commits = sorted((self.dir / _SAMPLES).glob("*.parquet"))
        seqs = {int(f.stem) for f in commits}
        tables = [pq.read_table(f) for f in commits]
        self.samples = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
        rej = sorted((self.dir / _REJECTS).glob("*.parquet"))
        rtables = [pq.read_table(f) for f in rej if int(f.stem) in seqs]
        self.rejects = pa.concat_tables(rtables) if rtables else REJECT_SCHEMA.empty_table()
        self.commit = _read_commit(commits[-1]) if commits else {"rows_end": 0, "lengths": {}}
        self._starts = {u: self.samples.column(f"{c}_start").to_numpy() for u, c in
                        (("tokens", "token"), ("labels", "label"), ("question", "question"))}
        self._counts = {u: self.samples.column(f"num_{c}").to_numpy() for u, c in
                        (("tokens", "tokens"), ("labels", "labels"), ("question", "question"))}
        self._arrays: dict[str, zarr.Array] = {}
        self.problems = self._check_bookkeeping(seqs)

    def _check_bookkeeping(self, seqs: set[int]) -> list[str]:
        """Structural damage visible without reading arrays: missing commit files, non-contiguous offsets."""
        problems = []
        missing = sorted(set(range(max(seqs) + 1)) - seqs) if seqs else []
        if missing:
            problems.append(f"commit file(s) {missing[:5]} missing from {self.dir / _SAMPLES} (a gap in the "
                            "commit sequence: those samples are lost)")
        for unit in ("tokens", "labels", "question"):
            ends = self._starts[unit] + self._counts[unit]
            gaps = np.flatnonzero(self._starts[unit][1:] != ends[:-1])
            if len(self) and (self._starts[unit][0] != 0 or len(gaps)):
                j = int(gaps[0]) + 1 if len(gaps) else 0
                problems.append(f"{unit} offsets have a gap at sample {j} ({self.samples['sample_id'][j]})")
            elif len(self) and int(ends[-1]) != self.commit["lengths"].get(unit, 0):
                problems.append(f"{unit} offsets end at {int(ends[-1])}, the last commit says "
                                f"{self.commit['lengths'].get(unit)}")
        return problems

    def __len__(self) -> int:
        return self.samples.num_rows

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(str(self.dir / name), mode="r")
            except Exception as e:  # zarr raises several types for missing/damaged metadata
                raise StoreError(f"part {self.name}: cannot open array {name!r} ({type(e).__name__}: {e}); "
                                 "run `inspect-cache --verify` for a full diagnosis") from e
        return self._arrays[name]

    def span(self, unit: str, start: int, stop: int) -> tuple[int, int]:
        """Row range of `unit` covering samples [start, stop)."""
        if stop <= start:
            return 0, 0
        return int(self._starts[unit][start]), int(self._starts[unit][stop - 1] + self._counts[unit][stop - 1])

    def read(self, start: int, stop: int) -> list[TeacherSample]:
        """Samples [start, stop) of this part, with one contiguous read per array."""
        blocks: dict[str, np.ndarray] = {}
        for name, spec in self.specs.items():
            lo, hi = self.span(spec.unit, start, stop)
            try:
                blocks[name] = self.array(name)[lo:hi]
            except Exception as e:
                raise StoreError(f"part {self.name}, array {name!r}, samples {start}..{stop - 1}: read failed "
                                 f"({type(e).__name__}: {e}); the store is damaged, run `inspect-cache --verify`"
                                 ) from e
        rows = self.samples.slice(start, stop - start).to_pylist()
        fd, out = self.meta["feature_dtype"], []
        for i, row in enumerate(rows):
            j = start + i

            def cut(name: str, j: int = j) -> np.ndarray:  # sample j's rows of the block read above
                unit = self.specs[name].unit
                lo = self._starts[unit][j] - self.span(unit, start, stop)[0]
                return blocks[name][lo : lo + self._counts[unit][j]]

            topk = self.meta["topk"]
            out.append(TeacherSample(
                sample_id=row["sample_id"], source_row=row["source_row"], part=self.name,
                messages=json.loads(row["messages"]), images=row["images"], image_paths=row["image_paths"],
                segments=json.loads(row["segments"]),
                token_ids=torch.from_numpy(cut("token_ids").astype(np.int64)),
                label_mask=torch.from_numpy(cut("label_mask").astype(bool)),
                features=from_storage(cut("features"), fd),
                targets=torch.from_numpy(cut("targets").astype(np.int64)),
                topk_ids=torch.from_numpy(cut("topk_ids").astype(np.int64)) if topk else None,
                topk_logprobs=torch.from_numpy(cut("topk_logprobs")) if topk else None,
                question_features=from_storage(cut("question_features"), fd) if self.meta["question_features"]
                else None,
                layers={k: from_storage(cut(f"layers/{k}"), fd) for k in self.meta.get("layers", [])},
                answers_generated=row["answers_generated"],
            ))
        return out


class TeacherStore:
    """Read side of a store: attributes, the teacher head, and committed samples of every part."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        parts_dir = self.path / "parts"
        names = sorted(p.name for p in parts_dir.iterdir() if (p / "zarr.json").exists()) if parts_dir.exists() else []
        self.parts = [Part(self.path, n, self.meta) for n in names]
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def feature_dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["feature_dtype"])

    def locate(self, index: int) -> tuple[Part, int]:
        """The part and local index of global sample `index` (parts in name order)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range (store has {len(self)})")
        k = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self.parts[k], index - int(self._offsets[k])

    def __getitem__(self, index: int) -> TeacherSample:
        part, i = self.locate(index)
        return part.read(i, i + 1)[0]

    def find(self, sample_id: str) -> TeacherSample:
        for part in self.parts:
            ids = part.samples.column("sample_id").to_pylist()
            if sample_id in ids:
                i = ids.index(sample_id)
                return part.read(i, i + 1)[0]
        raise KeyError(f"no sample {sample_id!r} in {self.path}")

    def blocks(self, block_size: int = 64) -> Iterator[list[TeacherSample]]:
        """Every committed sample, in contiguous blocks per part."""
        for part in self.parts:
            for s in range(0, len(part), block_size):
                yield part.read(s, min(s + block_size, len(part)))

    def head(self, name: str = "weight") -> torch.Tensor:
        """The teacher head's `weight` (V, D), `embed` (V, D; the weight when tied) or `bias` (V,)."""
        if name == "embed" and self.meta["head"]["tied"]:
            name = "weight"
        arr = zarr.open_array(str(self.path / "head" / name), mode="r")
        return from_storage(arr[...], self.meta["head"]["dtype"])

    def rejects(self) -> pa.Table:
        tables = [p.rejects for p in self.parts]
        return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()

