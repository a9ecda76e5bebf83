"""Whole shards encoded directly, byte for byte as zarr writes them: the inner chunks through the array's own codecs
(bytes, zstd, crc32c), the shard index after them, one file write per shard instead of zarr's read-merge-write path.
Also what a commit's shards are cut from (`Rows`) and the clock of a commit's steps (`StageClock`).

An array with other codecs (a store written by another version) is written through zarr as before.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from genrecal_cache.core.durable import fsync

NO_CHUNK = np.iinfo(np.uint64).max  # an index entry for a chunk the shard does not hold


def _with_crc(data: bytes) -> bytes:
    return data + np.uint32(google_crc32c.value(data)).tobytes()


def _little_endian(codec: object) -> bool:
    return isinstance(codec, BytesCodec) and getattr(codec.endian, "value", codec.endian) in ("little", None)


@dataclass(frozen=True)
class ShardEncoder:
    """Encodes the shards of one sharded array along its first axis (`chunk_rows` rows per chunk, `shard_rows`
    per shard; every other axis whole in each chunk), zero-filled as the array's fill value."""

    chunk_rows: int
    shard_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    zstd: numcodecs.Zstd

    @classmethod
    def of(cls, arr: zarr.Array) -> ShardEncoder | None:
        """The encoder for `arr`, or None when its layout or codecs are not the ones this writes (bytes, zstd,
        crc32c per chunk; bytes, crc32c for the index at the end; zero fill; chunks spanning all but axis 0)."""
        codecs = arr.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        inner, index = sharding.codecs, sharding.index_codecs
        if not (len(inner) == 3 and _little_endian(inner[0]) and isinstance(inner[1], ZstdCodec)
                and isinstance(inner[2], Crc32cCodec) and len(index) == 2 and _little_endian(index[0])
                and isinstance(index[1], Crc32cCodec) and sharding.index_location == ShardingCodecIndexLocation.end):
            return None
        chunk, shard = tuple(sharding.chunk_shape), tuple(arr.shards or ())
        if len(shard) != len(chunk) or chunk[1:] != tuple(arr.shape[1:]) or shard[1:] != chunk[1:]:
            return None
        if np.asarray(arr.fill_value).item() != 0 or shard[0] % chunk[0]:
            return None
        return cls(chunk[0], shard[0], chunk[1:], np.dtype(arr.dtype),
                   numcodecs.Zstd(level=inner[1].level, checksum=inner[1].checksum))

    def encode(self, rows: np.ndarray) -> bytes:
        """The bytes of a shard holding `rows` (1 to `shard_rows` rows from the shard's first): the chunks that
        hold any of them, the last one zero-padded, in order; then the index of (offset, length) per chunk of the
        shard, NO_CHUNK for those past the rows (zarr writes only chunks inside the array)."""
        if not 0 < len(rows) <= self.shard_rows or rows.shape[1:] != self.row_shape:
            raise ValueError(f"a shard holds 1 to {self.shard_rows} rows of shape {self.row_shape}, "
                             f"got {rows.shape}")
        rows = np.ascontiguousarray(rows, dtype=self.dtype.newbyteorder("<"))
        index = np.full((self.shard_rows // self.chunk_rows, 2), NO_CHUNK, dtype="<u8")
        parts, offset = [], 0
        for c in range(math.ceil(len(rows) / self.chunk_rows)):
            chunk = rows[c * self.chunk_rows:(c + 1) * self.chunk_rows]
            if len(chunk) < self.chunk_rows:
                chunk = np.concatenate([chunk, np.zeros((self.chunk_rows - len(chunk), *self.row_shape),
                                                        chunk.dtype)])
            data = _with_crc(bytes(self.zstd.encode(chunk)))  # the array's buffer itself, not a copy
            index[c] = offset, len(data)
            offset += len(data)
            parts.append(data)
        # The index has the shape of the chunk grid (chunks x 1 x ... x 2); its bytes are the same flattened.
        parts.append(_with_crc(index.tobytes()))
        return b"".join(parts)


def write_shard(path: Path, data: bytes) -> None:
    """Write one shard file as zarr's local store does (a `<name>.<hex>.partial` beside it, fsynced and renamed
    into place: a kill in between leaves only that, which the writer's recovery removes). The rename is durable
    once the folder is synced (`sync_folders`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sync_folders(files: list[Path], array_dir: Path) -> None:
    """fsync each folder from the shard files' up to their array's, once: their renames and any folder made for
    them, the deepest first."""
    folders: dict[Path, None] = {}
    for path in files:
        for d in path.parents:
            folders[d] = None
            if d == array_dir:
                break
    for d in sorted(folders, key=lambda d: len(d.parts), reverse=True):
        fsync(d)


class StageClock:
    """Seconds a writer's commits spent per step: on the writer thread (wall time) `copy` (tails joined to the
    pending rows), `shards` (waiting for the shard pool), `zarr` (arrays zarr writes itself: other codecs),
    `fsync` (folders, `zarr.json`), `table` (the Parquet tables); on the shard pool, summed over its threads
    (overlapping each other and `shards`), `encode` (shards compressed) and `write` (shard files written and
    fsynced). A nested step's time is not counted again in the step around it. Read by `tools/bench_store.py`."""

    STEPS = ("shards", "encode", "write", "zarr", "fsync", "copy", "table")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(self.STEPS, 0.0)
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread, per open step: the time its nested steps took

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        inner = self._local.__dict__.setdefault("inner", [])
        t = time.perf_counter()
        inner.append(0.0)
        try:
            yield
        finally:
            dt, nested = time.perf_counter() - t, inner.pop()
            with self._lock:
                self.seconds[step] += dt - nested
            if inner:
                inner[-1] += dt


class Rows:
    """An array's rows from `start` on, as the pieces they came in (the tail, then each sample's rows), joined
    only where a shard spans pieces."""

    def __init__(self, pieces: list[np.ndarray], start: int):
        self.pieces, self.start = pieces, start
        self.bounds = np.cumsum([start] + [len(p) for p in pieces])  # piece i holds rows bounds[i]..bounds[i+1]
        self.end = int(self.bounds[-1])

    def take(self, a: int, b: int) -> np.ndarray:
        """Rows a..b: a view when one piece holds them all."""
        first = int(np.searchsorted(self.bounds, a, side="right")) - 1
        parts = []
        for i in range(first, len(self.pieces)):
            lo, hi = int(self.bounds[i]), int(self.bounds[i + 1])
            if lo >= b:
                break
            parts.append(self.pieces[i][max(a, lo) - lo : min(b, hi) - lo])
        if len(parts) <= 1:
            return parts[0] if parts else self.pieces[0][:0]
        return np.concatenate(parts)
