"""The read side of a teacher store (docs/DESIGN.md, "The teacher store"): attributes, the teacher head, and the
committed samples of every writer's part, read in contiguous blocks. Writing lives in `store_writer.py`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from genrecal_cache.core.errors import StoreError, StoreServerError
from genrecal_cache.core.locations import Location

from .dtypes import FP8, SCALE, decode_features, from_storage
from .files import local_copy, names_under, object_sizes, read_many, server_failure
from .format import (
    COMMIT_FILE,
    REJECT_SCHEMA,
    REJECTS_DIR,
    SAMPLE_SCHEMA,
    SAMPLES_DIR,
    TOKENIZER_DIR,
    WRITER_FILE,
    commit_files,
    parse_part_name,
    part_arrays,
    part_name,
    read_commit,
    read_meta,
    retryable_flags,
    shard_file,
    shard_key,
    stray_files,
)
from .head import TeacherHead
from .sample import TeacherSample  # noqa: F401 (re-exported: readers import it from here)


class Part:
    """One writer's committed samples: its arrays and its Parquet tables. `root` a local folder (`dir` is the
    part's folder) or an object store's `Location` (`dir` is None; arrays through `zstore`, one client for all)."""

    def __init__(self, root: Path | Location, name: str, meta: dict[str, Any], zstore: Any = None):
        remote = isinstance(root, Location) and not root.is_local
        self.root = root if remote else None  # where server errors are named; None for a local store
        root = root if remote else Path(root.path) if isinstance(root, Location) else root
        self.name, self.meta, self._zstore = name, meta, zstore
        self.dir = None if remote else root / "parts" / name
        self.location = root.join("parts", name) if remote else Location.of(self.dir)
        self.specs = {s.name: s for s in part_arrays(meta)}
        self._listings: dict[str, set[str]] = {}
        if remote:
            seq_tables, strays = _remote_commits(self.location, SAMPLES_DIR, None)
        else:
            commits = commit_files(self.dir / SAMPLES_DIR)  # files of other names are not ours: see `strays`
            seq_tables = [(int(f.stem), pq.read_table(f)) for f in commits]
        seqs = {seq for seq, _ in seq_tables}
        tables = [t for _, t in seq_tables]
        # Commits of an older writer lack the newer columns (nulls here): a resumed store may have both kinds.
        self.samples = pa.concat_tables(tables, promote_options="default") if tables else SAMPLE_SCHEMA.empty_table()
        # Per commit number its record; per sample the commit that added it (--retry-rejects appends older rows).
        self.commits = {seq: json.loads((t.schema.metadata or {}).get(b"genrecal_commit", b"{}"))
                        for seq, t in seq_tables}
        self.sample_seqs = np.repeat([seq for seq, _ in seq_tables], [t.num_rows for t in tables]).astype(np.int64)
        if remote:
            rejects, rej_strays = _remote_commits(self.location, REJECTS_DIR, seqs)
            self.strays = [f"{SAMPLES_DIR}/{n}" for n in strays] + [f"{REJECTS_DIR}/{n}" for n in rej_strays]
            self.reject_log = _reject_log(rejects)
            self.commit = json.loads(tables[-1].schema.metadata[b"genrecal_commit"]) if tables else \
                {"rows_end": 0, "lengths": {}}
        else:
            rej = commit_files(self.dir / REJECTS_DIR)
            self.strays = [f"{sub}/{f.name}" for sub in (SAMPLES_DIR, REJECTS_DIR)
                           for f in stray_files(self.dir / sub)]
            self.reject_log = _reject_log([(int(f.stem), pq.read_table(f)) for f in rej if int(f.stem) in seqs])
            self.commit = read_commit(commits[-1]) if commits else {"rows_end": 0, "lengths": {}}
        self.rejects = self._effective_rejects()
        self.starts = {u: self.samples.column(f"{c}_start").to_numpy() for u, c in
                        (("tokens", "token"), ("labels", "label"), ("question", "question"))}
        self.counts = {u: self.samples.column(f"num_{c}").to_numpy() for u, c in
                        (("tokens", "tokens"), ("labels", "labels"), ("question", "question"))}
        self._arrays: dict[str, zarr.Array] = {}
        self.problems = self._check_bookkeeping(seqs)

    def server_failure(self, exc: BaseException, doing: str) -> StoreServerError | None:
        """The one-line error `exc` means if the server or the credentials failed (an object store only): readers
        raise it rather than call the store damaged."""
        return server_failure(self.root, exc, doing)

    def shard_present(self, name: str, shard: int) -> bool:
        """Whether shard `shard` of array `name` exists (on an object store, from one listing of the array)."""
        two_d = self.specs[name].width is not None
        if self.dir is not None:
            return shard_file(self.dir / name, shard, two_d).exists()
        if name not in self._listings:
            self._listings[name] = set(object_sizes(self.location.join(name)))
        return shard_key(shard, two_d) in self._listings[name]

    def _check_bookkeeping(self, seqs: set[int]) -> list[str]:
        """Structural damage visible without reading arrays: missing commit files, non-contiguous offsets."""
        problems = []
        missing = sorted(set(range(max(seqs) + 1)) - seqs) if seqs else []
        if missing:
            problems.append(f"commit file(s) {missing[:5]} missing from {self.location.join(SAMPLES_DIR)} (a gap in "
                            "the commit sequence: those samples are lost)")
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

    @functools.cached_property
    def has_question_features(self) -> np.ndarray:
        """(N,) bool: which samples' question features the part keeps (--question-features-fraction)."""
        if not self.meta["question_features"]:
            return np.zeros(len(self), bool)
        if "has_question_features" not in self.samples.column_names:
            return np.ones(len(self), bool)
        return self.samples.column("has_question_features").fill_null(True).to_numpy(zero_copy_only=False)

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(str(self.dir / name), mode="r") if self.dir is not None else \
                    zarr.open_array(store=self._zstore, path=f"parts/{self.name}/{name}", mode="r")
            except Exception as e:  # zarr raises several types for missing/damaged metadata
                if (err := self.server_failure(e, f"opening array {name!r} of part {self.name}")) is not None:
                    raise err from None
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
            except StoreServerError:
                raise
            except Exception as e:
                if (err := self.server_failure(e, f"reading part {self.name}, array {name!r}")) is not None:
                    raise err from None
                raise StoreError(f"part {self.name}, array {name!r}, samples {start}..{stop - 1}: read failed "
                                 f"({type(e).__name__}: {e}); the store is damaged, run `inspect-cache --verify`"
                                 ) from e
        rows = self.samples.slice(start, stop - start).to_pylist()
        fd, out, has_question = self.meta["feature_dtype"], [], self.has_question_features
        for i, row in enumerate(rows):
            j = start + i

            def cut(name: str, j: int = j) -> np.ndarray:  # sample j's rows of the block read above
                unit = self.specs[name].unit
                lo = self.starts[unit][j] - self.span(unit, start, stop)[0]
                return blocks[name][lo : lo + self.counts[unit][j]]

            def feat(name: str, cut=cut) -> torch.Tensor:  # fp8: dequantised with its rows' scales
                return decode_features(cut(name), cut(name + SCALE) if fd == FP8 else None, fd)

            topk = self.meta["topk"]
            out.append(TeacherSample(
                sample_id=row["sample_id"], source_row=row["source_row"], part=self.name,
                messages=json.loads(row["messages"]), images=row["images"], image_paths=row["image_paths"],
                segments=json.loads(row["segments"]),
                token_ids=torch.from_numpy(cut("token_ids").astype(np.int64)),
                label_mask=torch.from_numpy(cut("label_mask").astype(bool)),
                features=feat("features"),
                targets=torch.from_numpy(cut("targets").astype(np.int64)),
                topk_ids=torch.from_numpy(cut("topk_ids").astype(np.int64)) if topk else None,
                topk_logprobs=torch.from_numpy(cut("topk_logprobs")) if topk else None,
                question_features=feat("question_features") if has_question[j] else None,
                layers={k: feat(f"layers/{k}") for k in self.meta.get("layers", [])},
                answers_generated=row["answers_generated"],
                answer_truncated=bool(row.get("answer_truncated")),
                image_digests=row.get("image_digests") or [],
                storage_options=self.root.storage_options if self.root is not None else {},
            ))
        return out


def _remote_commits(part: Location, sub: str, only: set[int] | None) -> tuple[list[tuple[int, pa.Table]], list[str]]:
    """A remote part's commit tables of `sub` (samples/ or rejects/) in commit order (`only`: just these commit
    numbers), fetched concurrently, and the names there no writer wrote."""
    names = names_under(part.join(sub))
    files = [n for n in names if COMMIT_FILE.fullmatch(n) and (only is None or int(n[:8]) in only)]
    blobs = read_many(part.join(sub), files)
    return ([(int(n[:8]), pq.read_table(pa.BufferReader(blobs[n]))) for n in files if n in blobs],
            [n for n in names if not WRITER_FILE.fullmatch(n)])


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

    def __init__(self, path: Path | str, parts: dict[str, int] | None = None,
                 storage_options: dict[str, Any] | None = None):
        """`path`: a local folder or an fsspec URL (s3://bucket/prefix; `storage_options` as --storage-options
        gives them). `parts`: open exactly these parts, in this order, each holding at least the samples given (a
        reader in another process sees what the one that planned saw, though parts are added and commits made
        since)."""
        self.location = Location.of(path, storage_options)
        self.storage_options = dict(storage_options or {})
        self.remote = not self.location.is_local
        # `path`: the folder (a Path) of a local store, the URL of a remote one (for messages and to reopen it).
        self.path: Path | str = self.location.url if self.remote else Path(self.location.path)
        self._zstore = None
        if self.remote:
            self.location.check_reachable()  # a server down, wrong credentials, no bucket: named once, here
            self.meta = read_meta(self.location)
            self._zstore = self.location.zarr_store(read_only=True)
            names = parts if parts is not None else sorted(
                k.split("/")[1] for k in read_many(self.location, [
                    f"parts/{n}/zarr.json" for n in names_under(self.location.join("parts"))]))
            self.parts = [Part(self.location, n, self.meta, self._zstore) for n in names]
        else:
            self.meta = read_meta(self.path)
            parts_dir = self.path / "parts"
            names = sorted(p.name for p in parts_dir.iterdir() if (p / "zarr.json").exists()) \
                if parts_dir.exists() else []
            self.parts = [Part(self.path, n, self.meta) for n in (names if parts is None else parts)]
        for p in self.parts if parts is not None else []:
            if len(p) < parts[p.name]:
                raise StoreError(f"part {p.name} of {self.path} holds {len(p)} samples, {parts[p.name]} when it was "
                                 "opened before: it was rewritten meanwhile; start again")
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def tokenizer_dir(self) -> Path | None:
        """A local folder holding the teacher tokenizer the store keeps (a remote store's: copied once into the
        user's cache folder, keyed by the store's URL and tokenizer digest); None when it keeps none."""
        if not self.remote:
            path = self.path / TOKENIZER_DIR
            return path if path.exists() else None
        teacher = self.meta.get("teacher", {})
        return local_copy(self.location.join(TOKENIZER_DIR), {k: teacher.get(k) for k in
                                                               ("tokenizer_digest", "chat_template_digest")})

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def feature_dtype(self) -> torch.dtype:
        """The dtype of the features a reader gets (fp8 stores: dequantised to float32)."""
        return torch.float32 if self.meta["feature_dtype"] == FP8 else getattr(torch, self.meta["feature_dtype"])

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
        try:
            arr = zarr.open_array(str(self.path / "head" / name), mode="r") if not self.remote else \
                zarr.open_array(store=self._zstore, path=f"head/{name}", mode="r")
            data = arr[...]
        except Exception as e:
            if (err := server_failure(self.location, e, f"reading the teacher head ({name})")) is not None:
                raise err from None
            raise
        return from_storage(data, self.meta["head"]["dtype"])

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

