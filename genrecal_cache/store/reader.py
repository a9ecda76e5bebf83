"""The read side of a teacher store (docs/DESIGN.md, "The teacher store"): attributes, the teacher head, and the
committed samples of every writer's part, read in contiguous blocks. Writing lives in `store_writer.py`.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from genrecal_cache.core.errors import RejectError, StoreError

from .format import (
    REJECT_SCHEMA,
    REJECTS_DIR,
    SAMPLE_SCHEMA,
    SAMPLES_DIR,
    commit_files,
    from_storage,
    parse_part_name,
    part_arrays,
    part_name,
    read_commit,
    read_meta,
    retryable_flags,
    stray_files,
)
from .head import TeacherHead


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
    answer_truncated: bool = False
    image_digests: list[str] = field(default_factory=list)  # sha256 of each image's encoded bytes

    @property
    def label_positions(self) -> torch.Tensor:  # (A,)
        return self.label_mask.nonzero().squeeze(1)

    def image_data(self) -> list[bytes]:
        """Each image's encoded bytes: as stored, or read from its stored path (`--image-refs`), which must be a
        regular file still holding the image cached (its sha256 the stored digest); else a RejectError saying
        why. A store names any path: this reads no device or pipe, and never another image."""
        return [data if data is not None else _image_file(path, self.image_digests[k] if k < len(
            self.image_digests) else "", k) for k, (data, path) in enumerate(zip(self.images, self.image_paths))]


def _image_file(path: str, digest: str, k: int) -> bytes:
    p = Path(path)
    try:
        if not p.is_absolute() or not stat.S_ISREG(p.stat().st_mode):
            raise RejectError(f"image {k}'s stored path {path!r} is not a regular file (the store keeps no bytes "
                              "for it)")
        data = p.read_bytes()
    except OSError as e:
        raise RejectError(f"image {k} cannot be read from {path} ({e.strerror or e}); the store keeps only its "
                          "path (--image-refs): restore the file") from None
    now = hashlib.sha256(data).hexdigest()
    if digest and now != digest:
        raise RejectError(f"image {k} at {path} has changed since the store was written (sha256 {digest[:12]}… "
                          f"then, {now[:12]}… now): restore it, or cache the data again")
    return data


class Part:
    """One writer's committed samples: its arrays and its Parquet tables."""

    def __init__(self, root: Path, name: str, meta: dict[str, Any]):
        self.name, self.dir, self.meta = name, root / "parts" / name, meta
        self.specs = {s.name: s for s in part_arrays(meta)}
        commits = commit_files(self.dir / SAMPLES_DIR)  # files of other names are not ours: see `strays`
        seqs = {int(f.stem) for f in commits}
        tables = [pq.read_table(f) for f in commits]
        self.samples = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
        # Per commit number its record; per sample the commit that added it (--retry-rejects appends older rows).
        self.commits = {int(f.stem): json.loads((t.schema.metadata or {}).get(b"genrecal_commit", b"{}"))
                        for f, t in zip(commits, tables)}
        self.sample_seqs = np.repeat([int(f.stem) for f in commits], [t.num_rows for t in tables]).astype(np.int64)
        rej = commit_files(self.dir / REJECTS_DIR)
        self.strays = [f"{sub}/{f.name}" for sub in (SAMPLES_DIR, REJECTS_DIR) for f in stray_files(self.dir / sub)]
        self.reject_log = _reject_log([(int(f.stem), pq.read_table(f)) for f in rej if int(f.stem) in seqs])
        self.rejects = self._effective_rejects()
        self.commit = read_commit(commits[-1]) if commits else {"rows_end": 0, "lengths": {}}
        self.starts = {u: self.samples.column(f"{c}_start").to_numpy() for u, c in
                        (("tokens", "token"), ("labels", "label"), ("question", "question"))}
        self.counts = {u: self.samples.column(f"num_{c}").to_numpy() for u, c in
                        (("tokens", "tokens"), ("labels", "labels"), ("question", "question"))}
        self._arrays: dict[str, zarr.Array] = {}
        self.problems = self._check_bookkeeping(seqs)

    def _check_bookkeeping(self, seqs: set[int]) -> list[str]:
        """Structural damage visible without reading arrays: missing commit files, non-contiguous offsets."""
        problems = []
        missing = sorted(set(range(max(seqs) + 1)) - seqs) if seqs else []
        if missing:
            problems.append(f"commit file(s) {missing[:5]} missing from {self.dir / SAMPLES_DIR} (a gap in the "
                            "commit sequence: those samples are lost)")
        for unit in ("tokens", "labels", "question"):
            ends = self.starts[unit] + self.counts[unit]
            gaps = np.flatnonzero(self.starts[unit][1:] != ends[:-1])
            if len(self) and (self.starts[unit][0] != 0 or len(gaps)):
                j = int(gaps[0]) + 1 if len(gaps) else 0
                problems.append(f"{unit} offsets have a gap at sample {j} ({self.samples['sample_id'][j]})")
            elif len(self) and int(ends[-1]) != self.commit["lengths"].get(unit, 0):
                problems.append(f"{unit} offsets end at {int(ends[-1])}, the last commit says "
                                f"{self.commit['lengths'].get(unit)}")
        return problems

    def _effective_rejects(self) -> pa.Table:
        """The rejects that stand: a row's latest reject, unless a later commit (a --retry-rejects run) committed
        the row; so a retried row counts once, as committed."""
        log = self.reject_log.select(REJECT_SCHEMA.names)
        rows = self.reject_log.column("source_row").to_numpy()
        last = len(rows) - 1 - np.unique(rows[::-1], return_index=True)[1]  # each row's latest reject
        self._standing = np.sort(last[~np.isin(rows[last], self.samples.column("source_row").to_numpy())])
        if len(self._standing) == len(rows):  # the usual case: no row recorded twice
            return log
        return log.take(pa.array(self._standing, pa.int64()))

    def retryable_rows(self) -> set[int]:
        """Rows whose standing reject is retryable (the teacher failed on them): what --retry-rejects runs again."""
        rows, ok = (self.reject_log.column(c).to_pylist() for c in ("source_row", "retryable"))
        return {rows[i] for i in self._standing.tolist() if ok[i]}

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
        return int(self.starts[unit][start]), int(self.starts[unit][stop - 1] + self.counts[unit][stop - 1])

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
                lo = self.starts[unit][j] - self.span(unit, start, stop)[0]
                return blocks[name][lo : lo + self.counts[unit][j]]

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
                answer_truncated=bool(row.get("answer_truncated")),
                image_digests=row.get("image_digests") or [],
            ))
        return out


def _reject_log(files: list[tuple[int, pa.Table]]) -> pa.Table:
    """Every reject of the committed rejects files in commit order, with its commit `seq` and `retryable` flag."""
    tables = [t.select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA).replace_schema_metadata(None)
              .append_column("seq", pa.array([seq] * t.num_rows, pa.int64()))
              .append_column("retryable", pa.array(retryable_flags(t), pa.bool_())) for seq, t in files]
    if tables:
        return pa.concat_tables(tables)
    return REJECT_SCHEMA.append(pa.field("seq", pa.int64())).append(pa.field("retryable", pa.bool_())).empty_table()


class TeacherStore:
    """Read side of a store: attributes, the teacher head, and committed samples of every part."""

    def __init__(self, path: Path | str, parts: dict[str, int] | None = None):
        """`parts`: open exactly these parts, in this order, each holding at least the samples given (a reader in
        another process sees what the one that planned saw, though parts are added and commits made since)."""
        self.path = Path(path)
        self.meta = read_meta(self.path)
        parts_dir = self.path / "parts"
        names = sorted(p.name for p in parts_dir.iterdir() if (p / "zarr.json").exists()) if parts_dir.exists() else []
        self.parts = [Part(self.path, n, self.meta) for n in (names if parts is None else parts)]
        for p in self.parts if parts is not None else []:
            if len(p) < parts[p.name]:
                raise StoreError(f"part {p.name} of {self.path} holds {len(p)} samples, {parts[p.name]} when it was "
                                 "opened before: it was rewritten meanwhile; start again")
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

    def head(self, name: str = "weight") -> torch.Tensor:
        """The teacher head's `weight` (V, D), `embed` (V, D; the weight when tied) or `bias` (V,)."""
        if name == "embed" and self.meta["head"]["tied"]:
            name = "weight"
        arr = zarr.open_array(str(self.path / "head" / name), mode="r")
        return from_storage(arr[...], self.meta["head"]["dtype"])

    def teacher_head(self) -> TeacherHead:
        """The frozen teacher LM head (weight, bias, logit scale, softcap) as stored."""
        h = self.meta["head"]
        return TeacherHead(self.head("weight"), self.head("bias") if h["bias"] else None, h["logit_scale"],
                           h["softcap"])

    def rejects(self) -> pa.Table:
        tables = [p.rejects for p in self.parts]
        return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()

    def completeness(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(problems, notes). Problems, each (part, why), keep the store from being whole (docs/store.md, "A
        complete store"): a part its `num_shards` declares that is missing, or one whose last commit stops before
        the manifest rows its parts were written for (`rows_end` < the largest `rows_total`). Notes name the parts
        whose end cannot be judged: written before commits recorded `rows_total`."""
        n = self.meta.get("num_shards")
        problems: list[tuple[str, str]] = []
        notes: list[str] = []
        names = {p.name for p in self.parts}
        for i in range(n or 0):
            if part_name(i, n) not in names:
                problems.append((part_name(i, n), f"part {part_name(i, n)} is missing (the store has num_shards {n}): "
                                 f"write it with cache-teacher --shard {i}/{n} (or the job whose "
                                 "--data-parallel-size copy writes it)"))
        for p in self.parts:
            shard = parse_part_name(p.name)
            if n and (shard is None or shard[1] != n):
                problems.append((p.name, f"part {p.name} does not belong to a store of num_shards {n} (copied in?)"))
        target = max((p.commit["rows_total"] for p in self.parts if p.commit.get("rows_total") is not None),
                     default=None)
        for p in self.parts:
            if "seq" not in p.commit:
                problems.append((p.name, f"part {p.name} has no commit yet: run (or re-run) its cache-teacher "
                                 "command"))
            elif p.commit.get("rows_total") is None:
                notes.append(f"part {p.name} records no manifest row count (written before commits recorded it): "
                             "whether it is finished is not checked")
            elif p.commit["rows_end"] < target:
                problems.append((p.name, f"part {p.name} is unfinished: manifest rows < {p.commit['rows_end']} of "
                                 f"{target} done; re-run its cache-teacher command to finish it"))
        return problems, notes

