"""Is a teacher store intact? `verify` reads every chunk through its checksum (each once, blocks of samples read
concurrently ahead of the checks), checks every sample's bookkeeping and recomputes the top-k from features x
head; `full=False` is the cheap gate train-student runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from genrecal_cache.core.ahead import ahead
from genrecal_cache.core.errors import StoreServerError

from .dtypes import FP8, to_storage
from .format import carries_question_features, parse_part_name, question_fraction
from .head import TeacherHead
from .reader import Part, TeacherStore


@dataclass
class VerifyReport:
    chunks_read: int = 0
    samples_checked: int = 0
    label_tokens_checked: int = 0
    topk_compared: int = 0
    topk_mismatches: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth knowing, yet the store is whole (stray files)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, part: str, what: str, samples: tuple[int, int] | None, message: str, ids: list[str]) -> None:
        self.failures.append({"part": part, "array": what, "samples": list(samples) if samples else None,
                              "sample_ids": ids[:3], "message": message})

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "chunks_read": self.chunks_read, "samples_checked": self.samples_checked,
                "label_tokens_checked": self.label_tokens_checked, "topk_compared": self.topk_compared,
                "topk_mismatches": self.topk_mismatches, "failures": self.failures, "warnings": self.warnings,
                "first_failing_sample": next((f["sample_ids"][0] for f in self.failures if f["sample_ids"]), None)}


def _samples_for_rows(p: Part, unit: str, lo: int, hi: int) -> tuple[int, int] | None:
    """The sample range whose `unit` rows overlap [lo, hi)."""
    starts, counts = p.starts[unit], p.counts[unit]
    hit = np.flatnonzero((starts < hi) & (starts + counts > lo))
    return (int(hit[0]), int(hit[-1])) if len(hit) else None


READERS = 4  # blocks of samples read at once, ahead of the checks


def verify(store: TeacherStore, block: int = 64, atol: float | None = None, full: bool = True,
           allow_partial: bool = False, progress: bool = False) -> VerifyReport:
    """Read every chunk through its checksum, check every sample's bookkeeping, and recompute the top-k.

    The samples are read block by block, `READERS` blocks at once ahead of the checks (so each chunk is read once;
    on an object store the reads overlap); a block that fails to read is read again shard by shard to name the
    array and rows. `progress`: a bar over the samples on stderr.

    `full=False` does only what costs no array reads (the check train-student runs before it starts): the head
    against the teacher identity in the attributes, the store complete (every part declared present and finished;
    with `allow_partial` a missing or unfinished part is a warning), the commit files, every manifest row accounted
    for, every shard file present, array lengths against the commits."""
    rep = VerifyReport()
    meta = store.meta
    try:
        head = store.teacher_head()
    except Exception as e:  # a damaged head array
        rep.fail("head", "head", None, f"{type(e).__name__}: {e}", [])
        return rep
    digest = hashlib.sha256(to_storage(head.weight, meta["head"]["dtype"]).tobytes()).hexdigest()
    if digest != meta["teacher"].get("head_digest"):
        rep.fail("head", "head/weight", None, "the stored head is not the head of the teacher the attributes "
                 f"name ({meta['teacher'].get('name_or_path')}): the attributes or the head were changed", [])
    atol = atol if atol is not None else {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2, FP8: 5e-2}[meta["feature_dtype"]]
    problems, notes = store.completeness()
    for part, why in problems:  # a store with a part missing or unfinished is not whole, however intact
        if allow_partial:
            rep.warnings.append(f"{why} (accepted: --allow-partial)")
        else:
            rep.fail(part, "part", None, why, [])
    rep.warnings += notes
    seen: dict[str, str] = {}
    bar = tqdm(total=sum(len(p) for p in store.parts) if full else 0, unit="sample", desc="verify",
               disable=not (progress and full), dynamic_ncols=True)
    for p in store.parts:
        ids = p.samples.column("sample_id").to_pylist()
        for sid in ids:
            if sid in seen:
                rep.fail(p.name, "samples", None, f"sample id {sid!r} also in part {seen[sid]}", [sid])
            seen[sid] = p.name
        for problem in p.problems + _coverage_problems(p):
            rep.fail(p.name, "samples", None, problem, [])
        for name in p.strays:  # e.g. a macOS copy's ._00000000.parquet: readers and writers pass it over
            rep.warnings.append(f"part {p.name}: {name} is not a file cache-teacher writes; it is ignored (delete "
                                "it to silence this)")
        damaged = _verify_chunks(p, rep, ids, read=False)  # shards present, lengths: no array read
        if not full:
            continue
        rep.chunks_read += _chunks(p)
        todo = [(s, min(s + block, len(p))) for s in range(0, len(p), block)]
        for (s, e), samples in zip(todo, ahead(lambda se, p=p: _read(p, *se), todo, READERS)):
            bar.update(e - s)
            if any(lo <= e - 1 and s <= hi for lo, hi in damaged):
                continue
            if isinstance(samples, Exception):  # find the array and rows that fail, shard by shard
                found = _verify_chunks(p, rep, ids, read=True, samples=(s, e))
                damaged += found
                if not found:
                    rep.fail(p.name, "read", (s, e - 1), str(samples), ids[s:e])
                continue
            for i, smp in enumerate(samples):
                _verify_sample(p, s + i, smp, head, meta["topk"], atol, rep)
    bar.close()
    return rep


def _read(p: Part, start: int, stop: int) -> list | Exception:
    """Samples start..stop of `p`, or the exception reading them raised (a server failure is raised: it says
    nothing of the store)."""
    try:
        return p.read(start, stop)
    except StoreServerError:
        raise
    except Exception as e:
        if (err := p.server_failure(e, f"reading part {p.name}")) is not None:
            raise err from None
        return e


def _chunks(p: Part) -> int:
    """The chunks holding the part's committed rows."""
    n = 0
    for spec in p.specs.values():
        rows = p.commit["lengths"].get(spec.unit, 0) if len(p) else 0
        n += sum(-(-(min(lo + spec.shard_rows, rows) - lo) // spec.chunk_rows)
                 for lo in range(0, rows, spec.shard_rows))
    return n


def _coverage_problems(p: Part) -> list[str]:
    """Every manifest row this part owns below its last commit is committed or rejected, exactly once; except
    that a `--retry-rejects` run records again a row whose standing reject was retryable (a commit recording a
    row below the previous commit's `rows_end`): its new sample or reject supersedes the old reject."""
    shard = parse_part_name(p.name)
    if shard is None:
        return []
    i, n = shard
    by_seq: dict[int, list[tuple[int, bool | None]]] = {}  # commit -> (row, retryable; None for a sample)
    log = p.reject_log
    for row, seq, ok in zip(*(log.column(c).to_pylist() for c in ("source_row", "seq", "retryable"))):
        by_seq.setdefault(seq, []).append((row, ok))
    for row, seq in zip(p.samples.column("source_row").to_pylist(), p.sample_seqs.tolist()):
        by_seq.setdefault(seq, []).append((row, None))
    state: dict[int, bool | None] = {}  # row -> its standing record: retryable reject, other reject, sample (None)
    twice: list[int] = []
    prev_end = 0
    for seq in sorted(set(by_seq) | set(p.commits)):
        here: set[int] = set()
        for row, kind in by_seq.get(seq, []):
            # A row new to this commit must be unseen; one below the resume point may only supersede a retryable
            # reject; and no commit records a row twice.
            if row in here or (state.get(row) is not True if row < prev_end else row in state):
                twice.append(row)
            here.add(row)
            state[row] = kind
        prev_end = p.commits.get(seq, {}).get("rows_end", prev_end)
    problems = []
    if twice:
        problems.append(f"{len(twice)} manifest row(s) recorded twice, first {sorted(twice)[:5]} (only a row "
                        "rejected as retryable may be recorded again, by --retry-rejects)")
    missing = sorted(set(range(i, p.commit["rows_end"], n)) - set(state))
    if missing:
        problems.append(f"{len(missing)} manifest row(s) neither committed nor rejected, first {missing[:5]} "
                        "(a samples or rejects file is missing)")
    return problems


def _verify_chunks(p: Part, rep: VerifyReport, ids: list[str], read: bool = True,
                   samples: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Check each array shard by shard (its file present; with `read`, its chunks read through their
    checksums), or only the shards holding `samples` (start, stop) with `read`; returns the sample ranges that
    failed."""
    damaged = []
    for name, spec in p.specs.items():
        expected = p.commit["lengths"].get(spec.unit, 0) if len(p) else 0
        first, end = 0, expected
        if samples is not None:  # the rows of those samples, from the start of their first shard
            s, e = samples
            first = int(p.starts[spec.unit][s]) // spec.shard_rows * spec.shard_rows
            end = int(p.starts[spec.unit][e - 1] + p.counts[spec.unit][e - 1])
        try:
            arr = p.array(name)
        except StoreServerError:
            raise
        except Exception as e:
            rep.fail(p.name, name, (0, len(p) - 1) if len(p) else None, str(e), ids)
            damaged.append((0, len(p)))
            continue
        if arr.shape[0] < expected and samples is None:
            rng = _samples_for_rows(p, spec.unit, arr.shape[0], expected)
            rep.fail(p.name, name, rng, f"array has {arr.shape[0]} rows, commit says {expected}", ids[rng[0]:] if rng else [])
            damaged.append(rng or (0, len(p)))
        for lo in range(first, min(arr.shape[0], end), spec.shard_rows):
            hi = min(lo + spec.shard_rows, expected)
            try:
                if not p.shard_present(name, lo // spec.shard_rows):
                    raise FileNotFoundError(f"shard file {lo // spec.shard_rows} is missing")
                if read:
                    arr[lo:hi]
            except StoreServerError:
                raise
            except Exception as e:
                if (err := p.server_failure(e, f"reading part {p.name}, array {name!r}")) is not None:
                    raise err from None
                rng = _samples_for_rows(p, spec.unit, lo, hi)
                rep.fail(p.name, name, rng, f"rows {lo}..{hi - 1} unreadable ({type(e).__name__}: {str(e)[:160]})",
                         ids[rng[0]: rng[1] + 1] if rng else [])
                damaged.append(rng or (0, len(p)))
    return damaged


def _verify_sample(p: Part, j: int, smp: Any, head: TeacherHead, k: int, atol: float, rep: VerifyReport) -> None:
    rep.samples_checked += 1
    where = (j, j)

    def bad(what: str, msg: str) -> None:
        rep.fail(p.name, what, where, msg, [smp.sample_id])

    pos = smp.label_positions
    if len(pos) != len(smp.targets) or len(pos) == 0:
        return bad("label_mask", f"{len(pos)} label positions but {len(smp.targets)} targets")
    if pos[-1] + 1 >= len(smp.token_ids) or not torch.equal(smp.token_ids[pos + 1], smp.targets):
        return bad("targets", "targets are not the tokens that follow the label positions")
    feats = smp.features.float()
    n_bad = int((~torch.isfinite(feats)).sum())
    if n_bad:
        return bad("features", f"{n_bad} NaN/inf values")
    if smp.question_features is not None and len(smp.question_features) != len(smp.token_ids) - len(pos):
        return bad("question_features", "question features do not cover every non-label position")
    if p.meta["question_features"] and (smp.question_features is not None) != carries_question_features(
            smp.sample_id, question_fraction(p.meta)):
        return bad("question_features", f"{'has' if smp.question_features is not None else 'lacks'} question "
                   f"features, against --question-features-fraction {question_fraction(p.meta):g}'s choice by id")
    rep.label_tokens_checked += len(pos)
    if k:
        ids, lps = head.topk(feats, min(k + 1, head.weight.shape[0]))  # one more, to see ties at the edge
        stored = smp.topk_logprobs.float()
        rep.topk_compared += smp.topk_ids.numel()
        # Ids may swap only where neighbouring log-probabilities tie within tolerance (the k-th with the k+1-th
        # included): compare the log-probabilities always, the ids only where there is a clear gap.
        tie = (lps[:, :-1] - lps[:, 1:]) <= atol  # (A, k) when k + 1 were taken
        same = ids[:, :k] == smp.topk_ids
        same |= tie[:, :k]
        same[:, 1:] |= tie[:, : k - 1]
        lps = lps[:, :k]
        diff = (lps - stored).abs()
        mism = int((~same).sum()) + int((diff > atol).sum())
        rep.topk_mismatches += mism
        if mism:
            bad("topk", f"{mism} top-k entries differ from features x head (max |dlogp| {diff.max():.2e})")


def format_verify(r: VerifyReport) -> str:
    d = r.to_dict()
    lines = [f"verify: {'OK' if r.ok else 'FAILED'}  chunks read {d['chunks_read']}, samples {d['samples_checked']}, "
             f"label tokens {d['label_tokens_checked']}, top-k entries compared {d['topk_compared']}, "
             f"mismatches {d['topk_mismatches']}"]
    lines += [f"  warning: {w}" for w in r.warnings[:20]]
    for f in r.failures[:20]:
        rng = f"samples {f['samples'][0]}..{f['samples'][1]}" if f["samples"] else "-"
        lines.append(f"  part {f['part']}, array {f['array']}, {rng}: {f['message']}")
    if len(r.failures) > 20:
        lines.append(f"  ... and {len(r.failures) - 20} more")
    if d["first_failing_sample"]:
        lines.append(f"first failing sample: {d['first_failing_sample']}")
    return "\n".join(lines)
