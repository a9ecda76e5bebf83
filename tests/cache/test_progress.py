"""`inspect-cache --progress`: where a store being written stands, per part, from its commit records alone."""

from __future__ import annotations

import json

import pytest

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from tests.helpers import run_command

# Each command: one thread, and no kill point but the one a call gives.
ENV, DROP = {"OMP_NUM_THREADS": "1"}, ("GENRECAL_KILL_AT",)


def _progress(out, *flags: str):
    return run_command("inspect-cache", "--store", out, "--progress", *flags, env=ENV, drop_env=DROP, timeout=600)


def test_progress_of_a_job_stopped_half_way(zoo, demo_manifest, tmp_path):
    out = tmp_path / "s"
    job = ["--teacher", str(zoo["llava"]), "--manifest", str(demo_manifest), "--output", str(out),
           "--commit-every", "4", "--dtype", "float32", "--device", "cpu", "--no-progress", "--render-workers", "0"]
    killed = run_command("cache-teacher", *job, env={**ENV, "GENRECAL_KILL_AT": "committed:2"}, drop_env=DROP,
                         timeout=600)  # three commits made, then killed
    assert killed.returncode == -9, killed.stderr[-2000:]
    p = _progress(out, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    (part,) = json.loads(p.stdout)
    total = len(demo_manifest.read_text().splitlines())
    assert part["part"] == "shard-00000-of-00001" and part["commits"] == 3
    assert part["rows_end"] == 12 and part["rows_total"] == total and 0 < part["samples"] <= 12
    assert part["rows_per_s"] > 0 and part["eta_s"] is not None and part["last_commit_age_s"] >= 0
    projected = part["projected_bytes"]  # from the 12 rows' token counts, compression and table bytes
    text = _progress(out).stdout
    assert f"12/{total} (" in text and "shard-00000-of-00001" in text and "projected" in text
    run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=demo_manifest, output=out, commit_every=4,
                          dtype="float32", device="cpu", progress=False, render_workers=0, command=["test"]))  # resumed
    (part,) = json.loads(_progress(out, "--json").stdout)
    assert part["rows_end"] == total and "done" in _progress(out).stdout
    assert part["projected_bytes"] == pytest.approx(part["bytes"], rel=1e-3)  # a finished part: its own size
    assert projected == pytest.approx(part["bytes"], rel=0.3), (projected, part["bytes"])
