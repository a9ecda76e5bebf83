"""`cache-teacher --render-workers N`: rows rendered in worker processes give the store rendering in the job's
own process gives; a worker that dies stops the job cleanly, naming the row, and the same command resumes; a worker
forked after the job ran torch on several threads does not hang."""

from __future__ import annotations

import subprocess
import sys

import pytest

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify
from tests.cache.job.test_cache_teacher import assert_same_store
from tests.helpers import command_env, run_command


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


AFTER_THREADS = """
import sys
from pathlib import Path

import torch
from PIL import Image

from genrecal_cache.core.models import load_processor
from genrecal_cache.data.render import Renderer
from genrecal_cache.data.render_pool import Preparer, RenderPool, Task
from genrecal_cache.data.rows import Row

teacher, folder = sys.argv[1], Path(sys.argv[2])
Image.new("RGB", (640, 480), "white").save(folder / "big.png")
turn = [{"from": "human", "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "white"}]
tasks = [Task(Row(i, {"id": f"r{i}", "image": "big.png", "conversations": turn})) for i in range(4)]
renderer = Renderer(load_processor(teacher, processor_kwargs={"min_pixels": 640 * 480, "max_pixels": 640 * 480}))
torch.set_num_threads(2)
x = torch.randn(1500, 1500)
(x @ x).sum()  # what loading a teacher does: torch's OpenMP pool has two threads from now on
pool = RenderPool(Preparer(renderer, {"root": folder}), workers=1)
sizes = [r.inputs["pixel_values"].numel() for _, (_, r) in pool.prepare(tasks)]
pool.close()
print("rendered", len(sizes), min(sizes))
"""


def test_a_worker_forked_after_the_job_ran_torch_on_two_threads_renders_large_images(zoo, tmp_path):
    """A worker inherits an OpenMP pool without its threads: its first parallel op (sending a large tensor back
    through shared memory) waited for them forever, until workers ran on one thread as torch's DataLoader's do."""
    try:
        done = subprocess.run([sys.executable, "-c", AFTER_THREADS, str(zoo["qwen2vl"]), str(tmp_path)], timeout=120,
                              capture_output=True, text=True, env=command_env({"OMP_NUM_THREADS": "2"}))
    except subprocess.TimeoutExpired:
        pytest.fail("a render worker hung for 2 minutes sending back a rendered 640x480 image")
    assert done.returncode == 0, done.stderr[-3000:]
    count, pixels = map(int, done.stdout.split()[1:])
    assert count == 4 and pixels > 100_000  # large enough for torch to copy it on several threads
