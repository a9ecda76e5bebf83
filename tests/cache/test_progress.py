"""`inspect-cache --progress`: where a store being written stands, per part, from its commit records alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def _cli(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    if "GENRECAL_KILL_AT" not in env_extra:
        env.pop("GENRECAL_KILL_AT", None)
    return subprocess.run([sys.executable, "-m", "genrecal_cache", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_progress_of_a_job_stopped_half_way(zoo, demo_manifest, tmp_path):
    out = tmp_path / "s"
    job = ["cache-teacher", "--teacher", str(zoo["llava"]), "--manifest", str(demo_manifest), "--output", str(out),
           "--commit-every", "4", "--dtype", "float32", "--device", "cpu", "--no-progress", "--render-workers", "0"]
    killed = _cli(*job, GENRECAL_KILL_AT="committed:2")  # three commits made, then killed
    assert killed.returncode == -9, killed.stderr[-2000:]
    p = _cli("inspect-cache", "--store", str(out), "--progress", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    (part,) = json.loads(p.stdout)
    total = len(demo_manifest.read_text().splitlines())
    assert part["part"] == "shard-00000-of-00001" and part["commits"] == 3
    assert part["rows_end"] == 12 and part["rows_total"] == total and 0 < part["samples"] <= 12
    assert part["rows_per_s"] > 0 and part["eta_s"] is not None and part["last_commit_age_s"] >= 0
    text = _cli("inspect-cache", "--store", str(out), "--progress").stdout
    assert f"12/{total} (" in text and "shard-00000-of-00001" in text
    assert _cli(*job).returncode == 0  # resumed to the end
    (part,) = json.loads(_cli("inspect-cache", "--store", str(out), "--progress", "--json").stdout)
    assert part["rows_end"] == total and "done" in _cli("inspect-cache", "--store", str(out), "--progress").stdout
