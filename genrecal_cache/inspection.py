"""`inspect-cache`'s views: what is in a teacher store (summary), one sample's tokens with the teacher's targets
and top-k predictions (sample view), and where a store being written stands (progress). Integrity is
`store/verify.py`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from genrecal_cache.core.errors import ConfigError, StoreError, reason_kind
from genrecal_cache.core.locations import Location
from genrecal_cache.store.dtypes import FP8
from genrecal_cache.store.files import object_listing, object_sizes, read_many
from genrecal_cache.store.format import mixable_values, part_runs, question_fraction
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.size import StoreShape, human, store_bytes


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _sizes(store: TeacherStore) -> Callable[[str], int]:
    """The bytes a store keeps under a key prefix ("" for all of it): on an object store, from one listing."""
    if not store.remote:
        return lambda prefix: _du(store.path / prefix if prefix else store.path)
    sizes = object_sizes(store.location)
    return lambda prefix: sum(n for k, n in sizes.items() if not prefix or k.startswith(prefix + "/"))


def summary(store: TeacherStore) -> dict[str, Any]:
    """Counts, sizes, compression and identity of a store."""
    parts, logical, stored = [], 0, 0
    runs = part_runs(store.location if store.remote else store.path)
    du = _sizes(store)
    for p in store.parts:
        arrays = {}
        for name in p.specs:
            arr = p.array(name)
            nbytes = int(np.prod(arr.shape)) * arr.dtype.itemsize
            on_disk = du(f"parts/{p.name}/{name}")
            logical, stored = logical + nbytes, stored + on_disk
            arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": nbytes, "bytes_on_disk": on_disk}
        s = p.samples
        parts.append({
            "name": p.name, "samples": len(p), "rejects": p.rejects.num_rows, "rows_end": p.commit["rows_end"],
            "tokens": int(np.sum(s.column("num_tokens").to_numpy())) if len(p) else 0,
            "label_tokens": int(np.sum(s.column("num_labels").to_numpy())) if len(p) else 0,
            "question_tokens": int(np.sum(s.column("num_question").to_numpy())) if len(p) else 0,
            "arrays": arrays,
            # Each run of its writer: how it computed the numbers, and what differed from the store (accepted
            # with --allow-mixed-store); runs written before GenRecal recorded them have neither.
            "runs": [{"time": r.get("time"), "writer": r.get("writer"), "mixed": r.get("mixed", [])}
                     for r in runs.get(p.name, [])],
        })
    saved = _question_bytes_saved(store, parts)
    problems, notes = store.completeness()
    reasons = Counter(reason_kind(r) for r in store.rejects().column("reason").to_pylist())
    total = du("")
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
        "question_features_fraction": question_fraction(store.meta),
        "samples_with_question_features": sum(int(p.has_question_features.sum()) for p in store.parts),
        "question_feature_bytes_saved": saved,
        "layers": store.meta.get("layers", []),
        "answers": store.meta.get("answers", "dataset"),
        "generation": store.meta.get("generation"),
        "provenance": store.meta["provenance"],
        "writer": mixable_values(store.meta),
        "complete": not problems,
        "incomplete": [why for _, why in problems],
        "completeness_notes": notes,
        "mixed": [{"part": p["name"], "time": r["time"], **m} for p in parts for r in p["runs"] for m in r["mixed"]],
    }


def _question_bytes_saved(store: TeacherStore, parts: list[dict[str, Any]]) -> int:
    """What --question-features-fraction saved: the question positions of the samples left out, at the stored
    question-feature bytes per row (the raw row bytes while none is stored)."""
    if not store.meta["question_features"]:
        return 0
    left_out = sum(int(np.sum((p.samples.column("num_tokens").to_numpy() - p.samples.column("num_labels").to_numpy())
                              [~p.has_question_features])) for p in store.parts)
    arrays = [p["arrays"]["question_features"] for p in parts]
    rows, stored = sum(a["shape"][0] for a in arrays), sum(a["bytes_on_disk"] for a in arrays)
    per_row = stored / rows if rows else store_bytes(StoreShape(1, 0, 1, store.meta["teacher"]["hidden_size"],
                                                                 store.meta["feature_dtype"], 0))["question_features"]
    return round(left_out * per_row)


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
    path = store.tokenizer_dir()
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _generation(g: dict[str, Any]) -> str:
    how = "greedy" if not g["temperature"] else f"temperature {g['temperature']}, top-p {g['top_p']}, seed {g['seed']}"
    return f"{how}, at most {g['max_new_tokens']} tokens"


def _dtype_line(dtype: str) -> str:
    return "fp8 (float8_e4m3fn, a float32 scale per row)" if dtype == FP8 else dtype


def _question_line(s: dict[str, Any]) -> str:
    f = s["question_features_fraction"]
    if not s["question_features"] or f >= 1:
        return "yes" if s["question_features"] else "no"
    return (f"for a fraction {f:g} of the samples ({s['samples_with_question_features']} of {s['samples']}; "
            f"{human(s['question_feature_bytes_saved'])} saved)")


def format_summary(s: dict[str, Any]) -> str:
    t = s["teacher"]
    ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "n/a"
    per_tok = f"{s['bytes_per_label_token']:.0f} B" if s["bytes_per_label_token"] else "n/a"
    lines = [
        f"store            {s['path']}",
        f"teacher          {t['name_or_path']} ({t['architecture']}, hidden {t['hidden_size']}, vocab {t['vocab_size']})",
        f"features         {_dtype_line(s['feature_dtype'])}, top-k {s['topk']}, question features "
        f"{_question_line(s)}",
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
    w = s["writer"]
    lines.append(f"computed with    backend {w['backend']}, torch {w['versions.torch']}, transformers "
                 f"{w['versions.transformers']}" + (f", vLLM {w['versions.vllm']}" if w["versions.vllm"] else ""))
    if s["incomplete"]:
        lines.append("INCOMPLETE (train-student refuses it without --allow-partial):")
        lines += [f"  {problem}" for problem in s["incomplete"]]
    lines += [f"note: {n}" for n in s["completeness_notes"]]
    if s["mixed"]:
        lines.append("MIXED STORE: runs that computed the numbers otherwise, added with --allow-mixed-store:")
        short = {v: f"{v[:12]}…" if isinstance(v, str) and len(v) == 64 else v for m in s["mixed"]
                 for v in (m["store"], m["job"])}  # digests
        lines += [f"  part {m['part']}, run of {m['time']}: {m['key']} {short[m['store']]} in the store, "
                  f"{short[m['job']]} in that run" for m in s["mixed"]]
    if s["rejects_by_reason"]:
        lines.append("rejects by reason:")
        lines += [f"  {n:6d}  {r}" for r, n in s["rejects_by_reason"].items()]
    prov = s["provenance"]
    lines.append(f"created          {prov.get('time')} by {' '.join(prov.get('command', []))[:100]}")
    lines.append("versions         " + ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items()))
    return "\n".join(lines)


def format_sample(v: dict[str, Any]) -> str:
    lines = [f"sample {v['sample_id']} (part {v['part']}, row {v['source_row']}): {v['num_tokens']} tokens, "
             f"{v['num_labels']} label positions", f"{'pos':>5}  {'token':<24} {'target':<16} top-k"]
    for r in v["tokens"]:
        tok = repr(r["token"])[1:-1] + (f" x{r['repeat']}" if "repeat" in r else "")
        topk = "  ".join(f"{t!r}:{p:.3f}" for t, p in r.get("topk", []))
        lines.append(f"{r['pos']:>5}  {tok[:24]:<24} {repr(r['target'])[1:-1] if 'target' in r else '':<16} {topk}")
    return "\n".join(lines)



def progress(store: str | Path, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Where each part of a store being written stands, from its commit files alone (no arrays read): the manifest
    row it has committed up to, of how many (every shard's rows counted), its samples, the rate over its commits
    and the time left at that rate. `store` a local folder or an object store's URL (one listing of its parts)."""
    from genrecal_cache.store.format import COMMIT_FILE, SAMPLES_DIR, read_commit, read_meta

    root = Location.of(store, storage_options)
    try:
        meta = read_meta(root)
    except StoreError:  # the store is being created: no attributes yet, so no projection
        meta = None
    out = []
    for part, files in _part_files(root).items():
        names = [k for k in files if k.startswith(f"{SAMPLES_DIR}/") and COMMIT_FILE.fullmatch(k.split("/", 1)[1])]
        tables = _commit_files(root.join("parts", part), names)
        commits = [{"time": files[k][1], **read_commit(f)} for k, f in tables]  # older stores record no time
        counts = _sample_counts([f for _, f in tables], meta or {"question_features": False})
        table_bytes = sum(size for k, (size, _) in files.items() if k.startswith(f"{SAMPLES_DIR}/"))
        row: dict[str, Any] = {"part": part, "commits": len(commits), "rows_end": 0, "rows_total": None,
                               "samples": counts["samples"], "rows_per_s": None, "eta_s": None,
                               "last_commit_age_s": None, "bytes": sum(size for size, _ in files.values()),
                               "projected_bytes": None}
        if commits:
            first, last = commits[0], commits[-1]
            row.update(rows_end=last["rows_end"], rows_total=last.get("rows_total"),
                       last_commit_age_s=round(time.time() - last["time"], 1))
            if meta and row["rows_total"] and counts["samples"] and last["rows_end"]:
                row["projected_bytes"] = round(projected_bytes(
                    meta, counts, row["bytes"] - table_bytes, table_bytes, row["rows_total"] / last["rows_end"]))
            if len(commits) > 1 and last["time"] > first["time"]:
                rate = (last["rows_end"] - first["rows_end"]) / (last["time"] - first["time"])
                row["rows_per_s"] = round(rate, 2)
                if row["rows_total"] is not None and rate > 0:
                    row["eta_s"] = round(max(0, row["rows_total"] - last["rows_end"]) / rate)
        out.append(row)
    return out


def _part_files(root: Location) -> dict[str, dict[str, tuple[int, float]]]:
    """Per part (sorted), its files' (size, modification time) by path within the part: a walk of a local store's
    parts, one listing of an object store's. A store without parts yet is a ConfigError saying so."""
    out: dict[str, dict[str, tuple[int, float]]] = {}
    parts = root.join("parts")
    if root.is_local:
        folder = Path(parts.path)
        for part in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
            out[part.name] = {f.relative_to(part).as_posix(): (st.st_size, st.st_mtime)
                              for f in sorted(part.rglob("*")) if f.is_file() and (st := f.stat())}
    else:
        for key, (size, mtime) in sorted(object_listing(parts).items()):
            part, _, rest = key.partition("/")
            if rest:
                out.setdefault(part, {})[rest] = (size, mtime)
    if not out:
        raise ConfigError(f"--store {root}: no parts yet (is cache-teacher writing here?)")
    return out


def _commit_files(part: Location, names: list[str]) -> list[tuple[str, Path | pa.Buffer]]:
    """Each commit file as pyarrow reads it: its path, or its object's bytes (all fetched at once; one deleted since
    the listing is left out)."""
    if part.is_local:
        return [(n, Path(part.path) / n) for n in names]
    blobs = read_many(part, names)
    return [(n, pa.py_buffer(blobs[n])) for n in names if n in blobs]


def _sample_counts(files: list[Path | pa.Buffer], meta: dict[str, Any]) -> dict[str, int]:
    """Samples, tokens, label tokens and samples with question features in these commit files (columns only)."""
    import pyarrow.parquet as pq

    out = {"samples": 0, "tokens": 0, "labels": 0, "carried": 0}
    for f in files:
        names = pq.read_schema(f).names
        t = pq.read_table(f, columns=[c for c in ("num_tokens", "num_labels", "has_question_features") if c in names])
        out["samples"] += t.num_rows
        out["tokens"] += int(np.sum(t.column("num_tokens").to_numpy())) if t.num_rows else 0
        out["labels"] += int(np.sum(t.column("num_labels").to_numpy())) if t.num_rows else 0
        has = t.column("has_question_features").fill_null(True).to_numpy(zero_copy_only=False) \
            if "has_question_features" in names else np.ones(t.num_rows, bool)
        out["carried"] += int(has.sum()) if meta["question_features"] else 0
    return out


def projected_bytes(meta: dict[str, Any], counts: dict[str, int], array_bytes: int, table_bytes: int,
                    scale: float) -> float:
    """A part's bytes once `scale` times its samples are written (`store_bytes`), at the per-sample token counts, the
    share with question features, the compression and the table bytes per sample measured so far."""
    n = counts["samples"]
    shape = StoreShape(n, counts["labels"] / n, (counts["tokens"] - counts["labels"]) / n,
                       meta["teacher"]["hidden_size"], meta["feature_dtype"], meta["topk"], counts["carried"] / n,
                       len(meta.get("layers", [])))
    raw = store_bytes(shape)["total"]  # uncompressed arrays, no images
    return store_bytes(replace(shape, samples=n * scale, compression=raw / max(1, array_bytes),
                               image_bytes=table_bytes / n))["total"]


def format_progress(rows: list[dict[str, Any]]) -> str:
    """The progress table, one line per part."""
    def dur(s: float | None) -> str:
        return "?" if s is None else f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{s:.0f}s"

    lines = [f"{'part':<24} {'rows done':>16} {'samples':>9} {'rows/s':>8} {'ETA':>8} {'last commit':>12} "
             f"{'size':>10} {'projected':>10}"]
    for r in rows:
        total = r["rows_total"]
        done = f"{r['rows_end']}/{total} ({100 * r['rows_end'] / total:.0f}%)" if total else f"{r['rows_end']}/?"
        rate = "?" if r["rows_per_s"] is None else f"{r['rows_per_s']:.1f}"
        eta = "done" if total and r["rows_end"] >= total else dur(r["eta_s"])
        lines.append(f"{r['part']:<24} {done:>16} {r['samples']:>9} {rate:>8} {eta:>8} "
                     f"{dur(r['last_commit_age_s']) + ' ago' if r['commits'] else 'none':>12} {human(r['bytes']):>10} "
                     f"{'?' if r['projected_bytes'] is None else human(r['projected_bytes']):>10}")
    return "\n".join(lines)
