"""`cache-teacher --data-parallel-size d`: d copies of the job in subprocesses on one machine, each on its own GPUs
and writing its own part of the store; their counts are summed. `ray_launch.py` runs the same copies as Ray tasks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from genrecal_cache.core.config import to_argv
from genrecal_cache.core.errors import ConfigError, StoreError, TeacherFailure

from .config import CacheConfig, CacheResult


def copy_configs(cfg: CacheConfig, result_dir: Path | None = None) -> list[CacheConfig]:
    """The d copies of a job: copy j writes part i*d+j of n*d with its share of the render workers, the bar
    shown by copy 0 alone, and its counts in `result_dir/j.json` (when given)."""
    d = cfg.data_parallel_size
    return [replace(cfg, shard=f"{cfg.shard_index * d + j}/{cfg.num_shards * d}", data_parallel_size=1,
                    ray=False, ray_address=None, render_workers=cfg.render_workers // d,
                    progress=cfg.progress and j == 0,
                    result_json=None if result_dir is None else result_dir / f"{j}.json")
            for j in range(d)]


def add_counts(res: CacheResult, counts: dict[str, Any]) -> None:
    """Add one copy's `--result-json` counts to `res` (seconds: the longest copy's)."""
    for k, v in counts.items():
        if k == "reject_reasons":
            for kind, n in v.items():
                res.reject_reasons[kind] = res.reject_reasons.get(kind, 0) + n
        else:
            setattr(res, k, max(getattr(res, k), v) if k == "seconds" else getattr(res, k) + v)


def parts_failed(failed: list[str], teacher_failed: bool = False) -> StoreError | TeacherFailure:
    """The error when some parts failed (each named with why): the others are complete, re-running resumes. A
    teacher failure in any part (its exit status 3) keeps status 3, so whatever re-runs crashed jobs re-runs this."""
    msg = (f"{', '.join(failed)} failed (their errors are above); the other parts are complete. "
           "Re-run the same command: every part resumes after its last commit.")
    return TeacherFailure(msg) if teacher_failed else StoreError(msg)


def run_data_parallel(cfg: CacheConfig) -> CacheResult:
    """`--data-parallel-size d`: d copies of this job in subprocesses, copy j on its own GPUs, writing part
    i*d+j of n*d. Each copy resumes on its own; the result sums theirs."""
    d, per = cfg.data_parallel_size, cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    gpus: list[str] = []
    if cfg.device.startswith("cuda"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if len(gpus) < d * per:
            raise ConfigError(f"--data-parallel-size {d} x {per} GPUs per engine needs {d * per} GPUs, "
                              f"{len(gpus)} are visible")
    procs, tmp = [], Path(tempfile.mkdtemp(prefix="genrecal-dp-"))
    res, failed, codes = CacheResult(), [], set()
    try:  # the copies' result files go with their folder, also on Ctrl-C
        for j, child in enumerate(copy_configs(cfg, tmp)):
            env = dict(os.environ, GENRECAL_DIE_WITH_PARENT="1")  # a killed parent leaves no copy holding a lock
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[j * per : (j + 1) * per])
            procs.append((child, subprocess.Popen(
                [sys.executable, "-m", "genrecal_cache", "cache-teacher", *to_argv(child)], env=env,
                stdout=subprocess.DEVNULL)))
        for child, p in procs:
            if p.wait() != 0:
                failed.append(f"part {child.shard} (exit status {p.returncode})")
                codes.add(p.returncode)
                continue
            add_counts(res, json.loads(child.result_json.read_text()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        raise parts_failed(failed, teacher_failed=TeacherFailure.exit_status in codes)
    return res
