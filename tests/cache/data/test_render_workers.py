"""`cache-teacher --render-workers N`: rows rendered in worker processes give the store rendering in the job's
own process gives; a worker that dies stops the job cleanly, naming the row, and the same command resumes."""

from __future__ import annotations

import subprocess

import pytest

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify
from tests.cache.job.test_cache_teacher import assert_same_store
from tests.helpers import run_command


def _cache(zoo, manifest, out, workers: int, *extra: str, **env_extra: str) -> subprocess.CompletedProcess:
    """No kill point but the one `env_extra` gives."""
    return run_command("cache-teacher", "--teacher", zoo["qwen2vl"], "--manifest", manifest, "--output", out,
                       "--render-workers", workers, "--commit-every", "3", "--batch-tokens", "200", "--dtype",
                       "float32", "--device", "cpu", "--no-progress", *extra,
                       env={"OMP_NUM_THREADS": "1", **env_extra}, drop_env=("GENRECAL_KILL_AT",), timeout=600)


@pytest.fixture(scope="module")
def in_process(zoo, demo_manifest, tmp_path_factory):
    """The store of `_cache(..., workers=0)`, written in this process (rendering in the job's own process)."""
    out = tmp_path_factory.mktemp("w0") / "s"
    run_cache(CacheConfig(teacher=str(zoo["qwen2vl"]), manifest=demo_manifest, output=out, render_workers=0,
                          commit_every=3, batch_tokens=200, dtype="float32", device="cpu", progress=False,
                          command=["test"]))
    return out


def test_workers_write_the_store_the_job_writes_alone(zoo, demo_manifest, in_process, tmp_path):
    """Bad rows included: rejects, ids and every array byte-equal, with rows in flight across commits."""
    p = _cache(zoo, demo_manifest, tmp_path / "s", 2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_store(in_process, tmp_path / "s")


def test_a_dead_worker_stops_the_job_cleanly_and_the_job_resumes(zoo, demo_manifest, in_process, tmp_path):
    out = tmp_path / "s"
    p = _cache(zoo, demo_manifest, out, 1, GENRECAL_KILL_AT="render-row-7")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "a render worker died (worker pid" in p.stderr and "killed by SIGKILL" in p.stderr, p.stderr[-700:]
    assert "re-run the same command" in p.stderr and "Traceback" not in p.stderr
    partial = TeacherStore(out)
    assert 0 < len(partial) and verify(partial, allow_partial=True).ok  # rows before 7 committed, intact
    assert max(partial.parts[0].samples["source_row"].to_pylist()) < 7
    p = _cache(zoo, demo_manifest, out, 1)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_store(in_process, out)


def test_render_workers_flag_is_checked(zoo, demo_manifest, tmp_path):
    p = _cache(zoo, demo_manifest, tmp_path / "s", -1)
    assert p.returncode == 2 and "--render-workers must be >= 0" in p.stderr, p.stderr[-2000:]
