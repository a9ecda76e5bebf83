"""The teacher store's format (docs/DESIGN.md, "The teacher store"): names, schemas, array layout, dtypes and
the group attributes every reader and writer agree on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from zarr.codecs import Crc32cCodec, ZstdCodec

from genrecal_cache.core.errors import IncompatibleStoreError, StoreError, StoreNotFoundError
from genrecal_cache.core.locations import Location

from .dtypes import FP8, SCALE, np_dtype

FORMAT_VERSION = 1  # of the store layout; a store of another version is refused
ATTR = "genrecal"
CHUNK_BYTES = 1 << 20  # chunks of at least 1 MiB (docs/DESIGN.md)
CHUNKS_PER_SHARD = 16
SAMPLES_DIR, REJECTS_DIR = "samples", "rejects"
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
    ("answer_truncated", pa.bool_()),  # a generated answer cut off at --max-new-tokens (--truncated keep)
    # Whether its question features are stored (--question-features-fraction); absent from older stores: all are.
    ("has_question_features", pa.bool_()),
])
REJECT_SCHEMA = pa.schema([("source_row", pa.int64()), ("sample_id", pa.string()), ("reason", pa.string())])
# Each reject's kind, in its rejects file's schema metadata (older readers ignore it): {"retryable": [bool per row]}.
# Retryable: the teacher failed on the row (an error, out of memory, non-finite values), not its content.
REJECT_KINDS = "genrecal_rejects"
LEGACY_RETRYABLE = ("teacher forward failed", "teacher generation failed")  # files written before REJECT_KINDS


def retryable_flags(table: pa.Table) -> list[bool]:
    """Per row of one rejects file: whether `cache-teacher --retry-rejects` runs it again."""
    md = table.schema.metadata or {}
    if REJECT_KINDS.encode() in md:
        return [bool(x) for x in json.loads(md[REJECT_KINDS.encode()])["retryable"]]
    return [r.startswith(LEGACY_RETRYABLE) for r in table.column("reason").to_pylist()]


def carries_question_features(sample_id: str, fraction: float) -> bool:
    """Whether a store written with --question-features-fraction `fraction` keeps this sample's question features:
    decided by its id alone (a hash independent of the held-out split's), so every shard, run and resume agrees."""
    if fraction >= 1:
        return True
    h = hashlib.sha256(b"genrecal question features\0" + sample_id.encode()).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2**64


def question_fraction(meta: dict[str, Any]) -> float:
    """The store's --question-features-fraction (0 without question features; 1 in stores written before it)."""
    return float(meta.get("question_features_fraction", 1.0)) if meta["question_features"] else 0.0


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
    d, k, fd = meta["teacher"]["hidden_size"], meta["topk"], np_dtype(meta["feature_dtype"])
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
    if meta["feature_dtype"] == FP8:  # each feature array's per-row scales beside it
        specs += [ArraySpec(s.name + SCALE, s.unit, None, "float32") for s in specs if s.dtype == fd and s.width]
    return specs


# Write all-zero chunks too: then a shard file that is missing is damage, never silently "all zeros".
ARRAY_CONFIG = {"write_empty_chunks": True}


def shard_key(shard: int, two_d: bool) -> str:
    """The key of shard `shard` of an array, under the array (default chunk key encoding, "/" separator)."""
    return f"c/{shard}/0" if two_d else f"c/{shard}"


def shard_file(array_dir: Path, shard: int, two_d: bool) -> Path:
    """Where zarr keeps shard `shard` of an array in a local store."""
    return array_dir / shard_key(shard, two_d)


def codecs() -> list:
    """Each chunk: zstd, then a crc32c checksum. Level 1: on bf16 features every level from 1 to 9 gives the same
    ratio (~1.26x, all of it from entropy-coding the exponent bytes; there are no matches to find) and level 1
    compresses fastest (docs/store.md, "Store throughput"). Zarr records the codecs in each array's metadata, so
    stores written with another level read as before, and a resumed writer keeps an existing array's level."""
    return [ZstdCodec(level=1), Crc32cCodec()]


# --- parts ---------------------------------------------------------------------------------------------------

def part_name(index: int, count: int) -> str:
    """The part `--shard index/count` writes: `shard-0000i-of-0000n`."""
    return f"shard-{index:05d}-of-{count:05d}"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(index, count) of a part written by `--shard index/count`; None for a name `part_name` does not make."""
    m = re.fullmatch(r"shard-(\d+)-of-(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else None


COMMIT_FILE = re.compile(r"\d{8}\.parquet")  # in samples/ and rejects/: `{seq:08d}.parquet`
WRITER_FILE = re.compile(r"(\d{8})\.(parquet|tmp)")  # and the temp file of a commit being written


def commit_files(folder: Path) -> list[Path]:
    """The commit files of a part's `samples/` or `rejects/`, in commit order; other files are not the writer's
    (a macOS copy's `._00000000.parquet`, ...) and are ignored."""
    return sorted(f for f in folder.glob("*.parquet") if COMMIT_FILE.fullmatch(f.name)) if folder.is_dir() else []


def stray_files(folder: Path) -> list[Path]:
    """Files in a part's `samples/` or `rejects/` that no writer wrote (`inspect-cache --verify` names them)."""
    return sorted(f for f in folder.iterdir() if not WRITER_FILE.fullmatch(f.name)) if folder.is_dir() else []


# --- attributes -------------------------------------------------------------------------------------------------

def finished(path: Path | Location) -> bool:
    """Whether a store's creation completed (its attributes are written last); `path` a folder or a `Location`."""
    try:
        return ATTR in json.loads(Location.of(path).join("zarr.json").read_bytes()).get("attributes", {})
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def read_meta(path: Path | Location) -> dict[str, Any]:
    """The store's attributes; `path` a local folder or a `Location` (an object store's prefix)."""
    if isinstance(path, Location) and not path.is_local:
        try:
            attrs = json.loads(path.join("zarr.json").read_bytes()).get("attributes", {})
        except FileNotFoundError:
            raise StoreNotFoundError(f"{path}: no teacher store there (no zarr.json): check the URL; a store is the "
                                     "whole folder cache-teacher wrote, copied there") from None
    else:
        path = Path(path.path) if isinstance(path, Location) else path
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
_SETTINGS = ("dtype", "feature_dtype", "topk", "question_features", "question_features_fraction", "layers",
             "max_length", "num_shards", "answers", "generation", "source", "split", "columns", "duplicate_ids",
             "processor_kwargs")
_SETTING_DEFAULTS = {"question_features_fraction": 1.0}  # what a store written before the setting existed used
_OPTION = {"question_features_fraction": "--question-features-fraction",  # settings that are one option
           "feature_dtype": "--feature-dtype"}


def check_settings(path: Path | Location, settings: dict[str, Any], mixed: bool = True) -> None:
    """Raise if a finished store at `path` was written with other settings (no-op when there is none), or, without
    --allow-mixed-store, computed otherwise (`check_mixed`: backend and versions; the teacher's digests once the
    teacher is loaded)."""
    if not finished(path):
        return
    existing = read_meta(path)
    for key in _SETTINGS:
        a, b = (existing.get(key, _SETTING_DEFAULTS.get(key)), settings.get(key, _SETTING_DEFAULTS.get(key)))
        if a != b:
            if key in _OPTION:  # as the user writes the option
                name, b = f"{_OPTION[key]} {'fp8' if a == FP8 else a}", "fp8" if b == FP8 else b
            else:
                name, b = f"{key}={_short(a)}", _short(b)
            raise IncompatibleStoreError(
                f"{path} was written with {name}, this run asks for {b}; re-run with the store's setting or write "
                "to a new --output")
    if mixed and "writer" in settings:
        check_mixed(path, None, {k: v for k, v in settings.items() if k != "teacher"}, quiet=True)


def check_compatible(existing: dict, meta: dict, path: Path | Location) -> None:
    # Settings first: another --dtype also changes the head's digest, and the setting is the real cause.
    check_settings(path, meta, mixed=False)  # the teacher's digests after its architecture and head (check_mixed)
    for key in _IDENTITY:
        a, b = existing["teacher"].get(key), meta["teacher"].get(key)
        if a != b:
            raise IncompatibleStoreError(
                f"{path} was written by another teacher ({key}: {_short(a)} in the store, {_short(b)} now; store "
                f"teacher {existing['teacher'].get('name_or_path')!r}); write to a new --output or pass that teacher")


# How a job computed the numbers, beyond the settings and the teacher's architecture and head: a job that differs
# from the store in any of these is refused unless --allow-mixed-store (then the part's run records what differed).
MIXABLE = ("backend", "versions.torch", "versions.transformers", "versions.vllm", "teacher.weights_digest",
           "teacher.processor_digest")


def mixable_values(record: dict[str, Any]) -> dict[str, Any]:
    """The MIXABLE values of a store's attributes or of one run's provenance record (`writer`, `teacher`), None
    where it records none: a store written before they were recorded, or vLLM's version with another backend."""
    w, t = record.get("writer") or {}, record.get("teacher") or {}
    backend = w.get("backend", record.get("backend") if "teacher" in record else None)
    versions = w.get("versions") or ((record.get("provenance") or {}).get("versions", {}) if "teacher" in record
                                     else {})
    return {"backend": backend, "versions.torch": versions.get("torch"),
            "versions.transformers": versions.get("transformers"),
            "versions.vllm": versions.get("vllm") if backend == "vllm" else None,
            "teacher.weights_digest": t.get("weights_digest", w.get("weights_digest")),
            "teacher.processor_digest": t.get("processor_digest", w.get("processor_digest"))}


def mixed_differences(store: dict[str, Any], runs: list[dict[str, Any]], own: list[dict[str, Any]],
                      now: dict[str, Any]) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """How a job (`now`, its `mixable_values`) differs from a store: per key, from the store's attributes or, where
    they record none (an older store), the earliest run of any part that does (`runs`, oldest first), and from every
    earlier run of the job's own part (`own`). Returns (key, the store's value, the job's) for each difference, and
    the keys nothing in the store records (not compared)."""
    diffs, unrecorded = [], []
    for key in MIXABLE:
        ref = store.get(key)
        if ref is None:
            ref = next((r[key] for r in runs if r.get(key) is not None), None)
        if ref is None and now.get(key) is not None and (key != "versions.vllm" or store.get("backend") == "vllm"):
            unrecorded.append(key)
        if now.get(key) is None:  # vLLM's version: compared only between vLLM runs
            continue
        old = next((v for v in [ref, *(r.get(key) for r in own)] if v is not None and v != now[key]), None)
        if old is not None:
            diffs.append((key, old, now[key]))
    return diffs, unrecorded


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {_short(old)} in the store, {_short(new)} in this job" for key, old, new in diffs)


def part_runs(root: Path | Location) -> dict[str, list[dict[str, Any]]]:
    """Each part's provenance records, one per run of its writer (oldest first), from the part's attributes; read
    without opening the parts (safe while writers run). `root` a local folder or a `Location`."""
    out: dict[str, list[dict[str, Any]]] = {}
    if isinstance(root, Location) and not root.is_local:
        from .files import names_under, read_many

        found = read_many(root, [f"parts/{n}/zarr.json" for n in names_under(root.join("parts"))])
        for key, data in sorted(found.items()):
            try:
                out[key.split("/")[1]] = list(json.loads(data).get("attributes", {}).get("provenance", []))
            except json.JSONDecodeError:
                continue
        return out
    root = Path(root.path) if isinstance(root, Location) else root
    parts = Path(root) / "parts"
    for d in sorted(parts.iterdir()) if parts.is_dir() else []:
        try:
            out[d.name] = list(json.loads((d / "zarr.json").read_text()).get("attributes", {}).get("provenance", []))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def check_mixed(path: Path | Location, part: str | None, meta: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    """Refuse a job (`meta`: its settings, with `writer`, and its `teacher` identity once loaded) that computes the
    numbers otherwise than the store at `path` does (MIXABLE keys; also against every earlier run of its `part`),
    unless its `writer` allows it (--allow-mixed-store). Returns what the part's provenance records of this run:
    `writer` (backend, dtype, renderer settings, versions, the teacher's digests) and `mixed` (each difference
    accepted). A key the store does not record is not compared; unless `quiet`, a line says so."""
    teacher, allow = meta.get("teacher") or {}, (meta.get("writer") or {}).get("allow_mixed_store", False)
    record = {**meta.get("writer", {}), **{k: teacher.get(k) for k in ("weights_digest", "processor_digest")}}
    if not finished(path):
        return {"writer": record, "mixed": []}
    runs = part_runs(path)
    ordered = sorted((r for rs in runs.values() for r in rs if "writer" in r), key=lambda r: r.get("time", ""))
    own = [mixable_values(r) for r in runs.get(part or "", []) if "writer" in r]
    diffs, unrecorded = mixed_differences(mixable_values(read_meta(path)), [mixable_values(r) for r in ordered], own,
                                          mixable_values(meta))
    if unrecorded and not quiet:
        print(f"note: {path} records no {', '.join(unrecorded)} (written before GenRecal recorded them): not "
              f"compared with this job's; part {part} records this job's", file=sys.stderr)
    if diffs and not allow:
        old = {f["name"]: f["sha256"] for f in read_meta(path)["teacher"].get("weight_files", [])}
        new = {f["name"]: f["sha256"] for f in teacher.get("weight_files", [])}
        changed = sorted(n for n in old.keys() | new.keys() if old and old.get(n) != new.get(n))
        files = f"; weight files that differ: {', '.join(changed[:5])}" if changed else ""
        raise IncompatibleStoreError(
            f"{path} was written otherwise than this job writes ({describe_differences(diffs)}{files}): its parts "
            "would not hold the same teacher's numbers. Re-run with the store's teacher, backend and versions, "
            "write to a new --output, or pass --allow-mixed-store to add to it anyway (recorded in the part, shown "
            "by inspect-cache)")
    return {"writer": record, "mixed": [{"key": k, "store": a, "job": b} for k, a, b in diffs]}


def _short(value: Any) -> str:
    text = repr(value)
    return text[:14] + "…'" if isinstance(value, str) and len(value) == 64 else text


def read_commit(file: Path | pa.Buffer | pa.BufferReader) -> dict[str, Any]:
    """The commit record in a commit file's schema metadata (a path, or an object's bytes as a pyarrow Buffer)."""
    md = pq.read_schema(file).metadata or {}
    return json.loads(md[b"genrecal_commit"])

