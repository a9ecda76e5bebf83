"""`inspect-cache`: what is in a teacher store (summary), whether it is intact (verify), and one sample's
tokens with the teacher's targets and top-k predictions (sample view).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import reason_kind
from .head import TeacherHead
from .store import Part, TeacherStore
from .store_format import TOKENIZER_DIR, shard_file, to_storage


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summary(store: TeacherStore) -> dict[str, Any]:
    """Counts, sizes, compression and identity of a store."""
    parts, logical, stored = [], 0, 0
    for p in store.parts:
        arrays = {}
        for name in p.specs:
            arr = p.array(name)
            nbytes = int(np.prod(arr.shape)) * arr.dtype.itemsize
            on_disk = _du(p.dir / name)
            logical, stored = logical + nbytes, stored + on_disk
            arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": nbytes, "bytes_on_disk": on_disk}
        s = p.samples
        parts.append({
            "name": p.name, "samples": len(p), "rejects": p.rejects.num_rows, "rows_end": p.commit["rows_end"],
            "tokens": int(np.sum(s.column("num_tokens").to_numpy())) if len(p) else 0,
            "label_tokens": int(np.sum(s.column("num_labels").to_numpy())) if len(p) else 0,
            "question_tokens": int(np.sum(s.column("num_question").to_numpy())) if len(p) else 0,
            "arrays": arrays,
        })
    reasons = Counter(reason_kind(r) for r in store.rejects().column("reason").to_pylist())
    total = _du(store.path)
    label_tokens = sum(p["label_tokens"] for p in parts)
    return {
        "path": str(store.path),
        "samples": len(store),
        "rejects": sum(p["rejects"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "label_tokens": label_tokens,
        "question_tokens": sum(p["question_tokens"] for p in parts),
        "parts": parts,
        "bytes_on_disk": total,
        "array_bytes": logical,
        "array_bytes_on_disk": stored,
        "compression_ratio": logical / stored if stored else None,
        "bytes_per_label_token": total / label_tokens if label_tokens else None,
        "rejects_by_reason": dict(reasons.most_common()),
        "teacher": store.meta["teacher"],
        "feature_dtype": store.meta["feature_dtype"],
        "topk": store.meta["topk"],
        "question_features": store.meta["question_features"],
        "layers": store.meta.get("layers", []),
        "answers": store.meta.get("answers", "dataset"),
        "generation": store.meta.get("generation"),
        "provenance": store.meta["provenance"],
    }


@dataclass
class VerifyReport:
    chunks_read: int = 0
    samples_checked: int = 0
    label_tokens_checked: int = 0
    topk_compared: int = 0
    topk_mismatches: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, part: str, what: str, samples: tuple[int, int] | None, message: str, ids: list[str]) -> None:
        self.failures.append({"part": part, "array": what, "samples": list(samples) if samples else None,
                              "sample_ids": ids[:3], "message": message})

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "chunks_read": self.chunks_read, "samples_checked": self.samples_checked,
                "label_tokens_checked": self.label_tokens_checked, "topk_compared": self.topk_compared,
                "topk_mismatches": self.topk_mismatches, "failures": self.failures,
                "first_failing_sample": next((f["sample_ids"][0] for f in self.failures if f["sample_ids"]), None)}


def _samples_for_rows(p: Part, unit: str, lo: int, hi: int) -> tuple[int, int] | None:
    """The sample range whose `unit` rows overlap [lo, hi)."""
    starts, counts = p.starts[unit], p.counts[unit]
    hit = np.flatnonzero((starts < hi) & (starts + counts > lo))
    return (int(hit[0]), int(hit[-1])) if len(hit) else None


def verify(store: TeacherStore, block: int = 64, atol: float | None = None, full: bool = True) -> VerifyReport:
    """Read every chunk through its checksum, check every sample's bookkeeping, and recompute the top-k.

    `full=False` does only what costs no array reads (the check train-student runs before it starts): the head
    against the teacher identity in the attributes, the commit files, every manifest row accounted for, every
    shard file present, array lengths against the commits."""
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
    atol = atol if atol is not None else {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}[meta["feature_dtype"]]
    seen: dict[str, str] = {}
    for p in store.parts:
        ids = p.samples.column("sample_id").to_pylist()
        for sid in ids:
            if sid in seen:
                rep.fail(p.name, "samples", None, f"sample id {sid!r} also in part {seen[sid]}", [sid])
            seen[sid] = p.name
        for problem in p.problems + _coverage_problems(p):
            rep.fail(p.name, "samples", None, problem, [])
        damaged = _verify_chunks(p, rep, ids, read=full)
        for s in range(0, len(p) if full else 0, block):
            e = min(s + block, len(p))
            if any(lo <= e - 1 and s <= hi for lo, hi in damaged):
                continue
            try:
                samples = p.read(s, e)
            except Exception as err:
                rep.fail(p.name, "read", (s, e - 1), str(err), ids[s:e])
                continue
            for i, smp in enumerate(samples):
                _verify_sample(p, s + i, smp, head, meta["topk"], atol, rep)
    return rep


def _coverage_problems(p: Part) -> list[str]:
    """Every manifest row this part owns below its last commit is committed or rejected, exactly once."""
    m = re.fullmatch(r"shard-(\d+)-of-(\d+)", p.name)
    if not m:
        return []
    i, n = int(m.group(1)), int(m.group(2))
    rows = p.samples.column("source_row").to_pylist() + p.rejects.column("source_row").to_pylist()
    owned = set(range(i, p.commit["rows_end"], n))
    problems = []
    if len(rows) != len(set(rows)):
        problems.append(f"{len(rows) - len(set(rows))} manifest row(s) recorded twice")
    missing = sorted(owned - set(rows))
    if missing:
        problems.append(f"{len(missing)} manifest row(s) neither committed nor rejected, first {missing[:5]} "
                        "(a samples or rejects file is missing)")
    return problems


def _verify_chunks(p: Part, rep: VerifyReport, ids: list[str], read: bool = True) -> list[tuple[int, int]]:
    """Check each array shard by shard (its file present; with `read`, its chunks read through their
    checksums); returns the sample ranges that failed."""
    damaged = []
    for name, spec in p.specs.items():
        expected = p.commit["lengths"].get(spec.unit, 0) if len(p) else 0
        try:
            arr = p.array(name)
        except Exception as e:
            rep.fail(p.name, name, (0, len(p) - 1) if len(p) else None, str(e), ids)
            damaged.append((0, len(p)))
            continue
        if arr.shape[0] < expected:
            rng = _samples_for_rows(p, spec.unit, arr.shape[0], expected)
            rep.fail(p.name, name, rng, f"array has {arr.shape[0]} rows, commit says {expected}", ids[rng[0]:] if rng else [])
            damaged.append(rng or (0, len(p)))
        for lo in range(0, min(arr.shape[0], expected), spec.shard_rows):
            hi = min(lo + spec.shard_rows, expected)
            try:
                if not shard_file(p.dir / name, lo // spec.shard_rows, spec.width is not None).exists():
                    raise FileNotFoundError(f"shard file {lo // spec.shard_rows} is missing")
                if read:
                    arr[lo:hi]
                    rep.chunks_read += -(-(hi - lo) // spec.chunk_rows)
            except Exception as e:
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


def sample_view(store: TeacherStore, sample_id: str, k: int = 3) -> dict[str, Any]:
    """The teacher's tokens with their targets and top-k predictions, decoded where a tokenizer is stored."""
    smp = store.find(sample_id)
    tok = load_store_tokenizer(store)

    def dec(i: int) -> str:
        return tok.convert_ids_to_tokens(int(i)) if tok is not None else str(int(i))

    label_index = {int(p): a for a, p in enumerate(smp.label_positions)}
    rows: list[dict[str, Any]] = []
    for pos, tid in enumerate(smp.token_ids.tolist()):
        row: dict[str, Any] = {"pos": pos, "id": tid, "token": dec(tid)}
        if pos in label_index:
            a = label_index[pos]
            row["target"] = dec(smp.targets[a])
            if smp.topk_ids is not None:
                row["topk"] = [(dec(i), round(float(np.exp(lp)), 4)) for i, lp in
                               zip(smp.topk_ids[a, :k].tolist(), smp.topk_logprobs[a, :k].tolist())]
        rows.append(row)
    return {"sample_id": smp.sample_id, "part": smp.part, "source_row": smp.source_row,
            "messages": smp.messages, "segments": smp.segments, "num_tokens": len(smp.token_ids),
            "num_labels": len(smp.targets), "tokens": _fold_runs(rows)}


def _fold_runs(rows: list[dict[str, Any]], min_run: int = 4) -> list[dict[str, Any]]:
    """Show a run of >= `min_run` identical unlabelled tokens (image placeholders) as one row with `repeat`."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1]["id"] == rows[i]["id"] and "target" not in rows[j + 1]:
            j += 1
        if "target" not in rows[i] and j - i + 1 >= min_run:
            out.append({**rows[i], "repeat": j - i + 1})
            i = j + 1
        else:
            out.append(rows[i])
            i += 1
    return out


def load_store_tokenizer(store: TeacherStore) -> Any:
    path = store.path / TOKENIZER_DIR
    if not path.exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _generation(g: dict[str, Any]) -> str:
    how = "greedy" if not g["temperature"] else f"temperature {g['temperature']}, top-p {g['top_p']}, seed {g['seed']}"
    return f"{how}, at most {g['max_new_tokens']} tokens"


def format_summary(s: dict[str, Any]) -> str:
    t = s["teacher"]
    ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "n/a"
    per_tok = f"{s['bytes_per_label_token']:.0f} B" if s["bytes_per_label_token"] else "n/a"
    lines = [
        f"store            {s['path']}",
        f"teacher          {t['name_or_path']} ({t['architecture']}, hidden {t['hidden_size']}, vocab {t['vocab_size']})",
        f"features         {s['feature_dtype']}, top-k {s['topk']}, question features "
        f"{'yes' if s['question_features'] else 'no'}",
        f"layers           {', '.join(map(str, s['layers'])) or 'none (final features only)'}",
        "answers          " + ("from the dataset" if s["answers"] == "dataset" else
                                f"written by the teacher ({_generation(s['generation'])})"),
        f"samples          {s['samples']}  (rejects {s['rejects']})",
        f"tokens           {s['tokens']}  label {s['label_tokens']}  question {s['question_tokens']}",
        f"on disk          {s['bytes_on_disk'] / 2**20:.2f} MiB  ({per_tok} per label token), "
        f"arrays compressed {ratio}",
        "parts:",
    ]
    for p in s["parts"]:
        lines.append(f"  {p['name']}: {p['samples']} samples, {p['rejects']} rejects, rows < {p['rows_end']} done")
    if s["rejects_by_reason"]:
        lines.append("rejects by reason:")
        lines += [f"  {n:6d}  {r}" for r, n in s["rejects_by_reason"].items()]
    prov = s["provenance"]
    lines.append(f"created          {prov.get('time')} by {' '.join(prov.get('command', []))[:100]}")
    lines.append("versions         " + ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items()))
    return "\n".join(lines)


def format_verify(r: VerifyReport) -> str:
    d = r.to_dict()
    lines = [f"verify: {'OK' if r.ok else 'FAILED'}  chunks read {d['chunks_read']}, samples {d['samples_checked']}, "
             f"label tokens {d['label_tokens_checked']}, top-k entries compared {d['topk_compared']}, "
             f"mismatches {d['topk_mismatches']}"]
    for f in r.failures[:20]:
        rng = f"samples {f['samples'][0]}..{f['samples'][1]}" if f["samples"] else "-"
        lines.append(f"  part {f['part']}, array {f['array']}, {rng}: {f['message']}")
    if len(r.failures) > 20:
        lines.append(f"  ... and {len(r.failures) - 20} more")
    if d["first_failing_sample"]:
        lines.append(f"first failing sample: {d['first_failing_sample']}")
    return "\n".join(lines)


def format_sample(v: dict[str, Any]) -> str:
    lines = [f"sample {v['sample_id']} (part {v['part']}, row {v['source_row']}): {v['num_tokens']} tokens, "
             f"{v['num_labels']} label positions", f"{'pos':>5}  {'token':<24} {'target':<16} top-k"]
    for r in v["tokens"]:
        tok = repr(r["token"])[1:-1] + (f" x{r['repeat']}" if "repeat" in r else "")
        topk = "  ".join(f"{t!r}:{p:.3f}" for t, p in r.get("topk", []))
        lines.append(f"{r['pos']:>5}  {tok[:24]:<24} {repr(r['target'])[1:-1] if 'target' in r else '':<16} {topk}")
    return "\n".join(lines)



def progress(root: Path) -> list[dict[str, Any]]:
    """Where each part of a store being written stands, from its commit files alone (no arrays read): the manifest
    row it has committed up to, of how many (every shard's rows counted), its samples, the rate over its commits
    and the time left at that rate."""
    import pyarrow.parquet as pq

    from .store_format import SAMPLES_DIR, read_commit

    out = []
    for part in sorted(p for p in (Path(root) / "parts").iterdir() if p.is_dir()):
        files = sorted((part / SAMPLES_DIR).glob("*.parquet"))
        commits = [{"time": f.stat().st_mtime, **read_commit(f)} for f in files]  # older stores record no time
        row: dict[str, Any] = {"part": part.name, "commits": len(commits), "rows_end": 0, "rows_total": None,
                               "samples": sum(pq.read_metadata(f).num_rows for f in files), "rows_per_s": None,
                               "eta_s": None, "last_commit_age_s": None}
        if commits:
            first, last = commits[0], commits[-1]
            row.update(rows_end=last["rows_end"], rows_total=last.get("rows_total"),
                       last_commit_age_s=round(time.time() - last["time"], 1))
            if len(commits) > 1 and last["time"] > first["time"]:
                rate = (last["rows_end"] - first["rows_end"]) / (last["time"] - first["time"])
                row["rows_per_s"] = round(rate, 2)
                if row["rows_total"] is not None and rate > 0:
                    row["eta_s"] = round(max(0, row["rows_total"] - last["rows_end"]) / rate)
        out.append(row)
    return out


def format_progress(rows: list[dict[str, Any]]) -> str:
    """The progress table, one line per part."""
    def dur(s: float | None) -> str:
        return "?" if s is None else f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{s:.0f}s"

    lines = [f"{'part':<24} {'rows done':>16} {'samples':>9} {'rows/s':>8} {'ETA':>8} {'last commit':>12}"]
    for r in rows:
        total = r["rows_total"]
        done = f"{r['rows_end']}/{total} ({100 * r['rows_end'] / total:.0f}%)" if total else f"{r['rows_end']}/?"
        rate = "?" if r["rows_per_s"] is None else f"{r['rows_per_s']:.1f}"
        eta = "done" if total and r["rows_end"] >= total else dur(r["eta_s"])
        lines.append(f"{r['part']:<24} {done:>16} {r['samples']:>9} {rate:>8} {eta:>8} "
                     f"{dur(r['last_commit_age_s']) + ' ago' if r['commits'] else 'none':>12}")
    return "\n".join(lines)
