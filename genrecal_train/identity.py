"""What makes a run the same run: its options, its store and its starting student, recorded in every checkpoint and
compared on `--resume` (`MAY_CHANGE_ON_RESUME` lists the options that may differ); and whether `--output` already
holds a run, which a new command may only `--resume` or `--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

from genrecal_cache.core.config import SECRET_OPTIONS
from genrecal_cache.core.errors import ConfigError
from genrecal_cache.core.locations import redact_storage_options
from genrecal_cache.store.reader import TeacherStore

from . import dist
from .config import TrainConfig

# The options a resumed stage may take other values of, by design; every other option, the store and the starting
# student must be the checkpoint's (docs/DESIGN.md, "Checkpoints and exact resume").
MAY_CHANGE_ON_RESUME = frozenset({
    # what is logged and reported, and how often: no number of the training depends on them
    "log_every", "report_to", "reliance_every", "save_every", "progress",
    "eval_every", "eval_loss_samples", "eval_samples", "eval_max_new_tokens", "keep_best",  # validation, best/
    # how long the stage runs: --max-steps / --epochs extend (or shorten) it; the LR schedule stays the saved one
    "max_steps", "epochs",
    # how the same batches and sums are computed: data worker processes, prefetching, kernel paths (the same maths,
    # to rounding), recomputing activations in backward
    "num_workers", "prefetch", "impl", "gradient_checkpointing",
    # checks and extra outputs beside the training; --allow-partial only permits: the parts and rows are compared
    "verify_store", "save_adapter", "allow_partial",
    # the command itself and where things are found: the store is compared by its content, the starting student by
    # its path and digest; --stage all and --stage k reach the same stage checkpoint
    "resume", "overwrite", "output", "store", "stage", "storage_options",
})
_PATHS = ("student", "recalibrator")  # compared as resolved paths: ./x and /abs/x are one folder
RUN_FILES = ("checkpoint", "checkpoint.old", "final", "final.old", "metrics.jsonl")  # a stage folder holding a run


def options(cfg: TrainConfig) -> dict[str, str]:
    """Every option of the run as a string (the checkpoint's `config`)."""
    return {k: str(redact_storage_options(v) if k in SECRET_OPTIONS else v) for k, v in asdict(cfg).items()
            if k != "command"}


def store_identity(store: TeacherStore) -> dict[str, str]:
    """The store as training sees it: its attributes (teacher identity and settings, flattened to dotted keys; not
    the provenance of the job that created it) and per part its committed samples (count and a digest of their
    ids, in order): a part that grew or changed moves every later position of the block order."""
    out = _flat({k: v for k, v in store.meta.items() if k != "provenance"})
    for p in store.parts:
        ids = "\n".join(p.samples.column("sample_id").to_pylist())
        out[f"parts.{p.name}"] = f"{len(p)} samples, ids {hashlib.sha256(ids.encode()).hexdigest()[:16]}"
    return out


def student_identity(path: str) -> dict[str, str]:
    """The student a stage starts from: its resolved path and a digest of its config.json and its weights' index
    (tensor names, shapes and dtypes from the safetensors headers or the index file; not the weight values)."""
    folder = Path(path)
    if not folder.is_dir():  # a hub id: compared by name
        return {"path": path, "digest": "(not a local folder)"}
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.name.endswith(".index.json"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix == ".safetensors":
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(f.name.encode() + fh.read(n))
        elif f.suffix in (".bin", ".pt", ".pth"):
            h.update(f"{f.name} {f.stat().st_size}".encode())
    return {"path": str(folder.resolve()), "digest": h.hexdigest()[:16]}


def run_identity(cfg: TrainConfig, store: TeacherStore, student: str) -> dict[str, dict[str, str]]:
    """What a checkpoint records of its run: options, store, starting student."""
    return {"config": options(cfg), "store": store_identity(store), "student": student_identity(student)}


def check_same_run(saved: dict[str, Any], now: dict[str, dict[str, str]], ckpt: Path) -> None:
    """Refuse to resume the checkpoint in `ckpt` (its trainer state `saved`) under another run: every option not in
    MAY_CHANGE_ON_RESUME, the store and the starting student must be equal; the error names each difference with
    its old and new value. A checkpoint written before identities were recorded is compared by its options only."""
    old = saved.get("identity") or {"config": saved.get("config", {})}
    diffs = []
    for section, label in (("config", "--{}"), ("store", "store {}"), ("student", "starting student {}")):
        if section not in old:
            continue
        a, b = old[section], now[section]
        for key in sorted(set(a) | set(b)):
            if section == "config" and (key in MAY_CHANGE_ON_RESUME or key not in a or key not in b):
                continue  # may change, or only one version of train-student has it
            va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
            if section == "config" and key in _PATHS:
                va, vb = _resolved(va), _resolved(vb)
            if va != vb:
                name = label.format(key.replace("_", "-") if section == "config" else key)
                diffs.append(f"  {name}: {_short(va)} (checkpoint) -> {_short(vb)} (now)")
    if diffs:
        raise ConfigError(f"--resume: the checkpoint in {ckpt} belongs to another run; this command differs in:\n"
                          + "\n".join(diffs) + "\nResume with the run's own options and inputs (options that may "
                          "change: " + ", ".join(f"--{k.replace('_', '-')}" for k in sorted(MAY_CHANGE_ON_RESUME))
                          + "), or start over with --overwrite")


def previous_run(cfg: TrainConfig) -> list[str]:
    """What the stages this command trains already hold in --output (checkpoint, final, metrics)."""
    found = [cfg.output / f"stage{k}" / name for k in cfg.stages for name in RUN_FILES]
    return [str(f.relative_to(cfg.output)) for f in found  # a metrics file a stage that never logged left is empty
            if f.exists() and not (f.name == "metrics.jsonl" and f.stat().st_size == 0)]


def claim_output(cfg: TrainConfig, main: bool) -> None:
    """Before anything is written: an output holding a run of these stages is continued (--resume), started over
    (--overwrite: their stage folders are removed, by rank 0) or refused. Every rank looks before any rank writes."""
    found = previous_run(cfg)
    dist.barrier()
    if found and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"--output {cfg.output} already holds a run ({', '.join(found)}): pass --resume to "
                          "continue it, or --overwrite to start over (removes its "
                          + ", ".join(f"stage{k}/" for k in cfg.stages if (cfg.output / f"stage{k}").exists())
                          + ")")
    if found and cfg.overwrite and main:
        gone = [d for d in (cfg.output / f"stage{k}" for k in cfg.stages) if d.exists()]
        for d in gone:
            shutil.rmtree(d)
        print(f"train-student: --overwrite: removed {', '.join(str(d) for d in gone)}", flush=True)
    dist.barrier()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str)
    return out


def _resolved(value: str) -> str:
    return str(Path(value).resolve()) if value not in ("None", "(absent)") and Path(value).exists() else value


def _short(value: str, limit: int = 100) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"
