"""The read side of a teacher store (docs/DESIGN.md, "The teacher store"): attributes, the teacher head, and the
committed samples of every writer's part, read in contiguous blocks. Writing lives in `store_writer.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from genrecal_cache.core.errors import StoreError

from .format import (
    REJECT_SCHEMA,
    REJECTS_DIR,
    SAMPLE_SCHEMA,
    SAMPLES_DIR,
    from_storage,
    part_arrays,
    read_commit,
    read_meta,
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

    @property
    def label_positions(self) -> torch.Tensor:  # (A,)
        return self.label_mask.nonzero().squeeze(1)


class Part:
    """One writer's committed samples: its arrays and its Parquet tables."""

    def __init__(self, root: Path, name: str, meta: dict[str, Any]):
        self.name, self.dir, self.meta = name, root / "parts" / name, meta
        self.specs = {s.name: s for s in part_arrays(meta)}
        commits = sorted((self.dir / SAMPLES_DIR).glob("*.parquet"))
        seqs = {int(f.stem) for f in commits}
        tables = [pq.read_table(f) for f in commits]
        self.samples = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
        rej = sorted((self.dir / REJECTS_DIR).glob("*.parquet"))
        rtables = [pq.read_table(f) for f in rej if int(f.stem) in seqs]
        self.rejects = pa.concat_tables(rtables) if rtables else REJECT_SCHEMA.empty_table()
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
