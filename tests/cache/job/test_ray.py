"""`cache-teacher --ray`: the data-parallel copies as Ray tasks on a local Ray cluster (CPU, transformers backend)
write the parts `--shard j/2` writes, hold what a single-process run holds, and a crashed part is re-run by Ray."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from genrecal_cache.core.errors import ConfigError
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify
from tests.cache.job.test_cache_teacher import assert_same_store
from tests.helpers import run_command

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray: pip install -e '.[ray]'")
OPTIONS = dict(dtype="float32", device="cpu", commit_every=3, render_workers=0, progress=False)


def _cache_ray(zoo, manifest, out, *extra: str, **env_extra: str) -> subprocess.CompletedProcess:
    """The real CLI on a new local Ray cluster (the machine's CPUs: two tasks at once here)."""
    argv = ["--teacher", str(zoo["llava"]), "--manifest", str(manifest), "--output", str(out), "--ray",
            "--ray-address", "local", "--data-parallel-size", "2", "--result-json", str(out) + ".json",
            *(f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items() if k != "progress"), "--no-progress",
            *extra]
    return run_command("cache-teacher", *argv, env={"OMP_NUM_THREADS": "1", **env_extra},
                       drop_env=("GENRECAL_KILL_AT", "RAY_ADDRESS"), timeout=300)


@pytest.fixture(scope="module")
def expected(zoo, demo_manifest, tmp_path_factory):
    """In this process: the two parts `--data-parallel-size 2` writes (`--shard 0/2`, `1/2`) and one part alone."""
    root = tmp_path_factory.mktemp("expected")
    for shard in ("0/2", "1/2"):
        run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=demo_manifest, output=root / "parts", shard=shard,
                              command=["test"], **OPTIONS))
    single = run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=demo_manifest, output=root / "single",
                                   command=["test"], **OPTIONS))
    return root / "parts", root / "single", single


def _assert_same_samples(a: TeacherStore, b: TeacherStore) -> None:
    """Sample for sample by id, whatever the parts: equal tokens and labels, features and top-k (other batches:
    equal to float32 rounding), and the same rejects."""
    ids = sorted(sid for part in a.parts for sid in part.samples.column("sample_id").to_pylist())
    assert ids == sorted(sid for part in b.parts for sid in part.samples.column("sample_id").to_pylist()) and ids
    for sid in ids:
        x, y = a.find(sid), b.find(sid)
        assert (x.source_row, x.messages, x.images) == (y.source_row, y.messages, y.images)
        for name in ("token_ids", "label_mask", "targets", "topk_ids"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (sid, name)
        for name in ("features", "topk_logprobs"):
            assert torch.allclose(getattr(x, name), getattr(y, name), atol=1e-5), (sid, name)
    rejects = [sorted(zip(s.rejects().column("source_row").to_pylist(), s.rejects().column("reason").to_pylist()))
               for s in (a, b)]
    assert rejects[0] == rejects[1] and rejects[0]


@needs_ray
def test_ray_tasks_write_the_parts_and_the_samples_of_one_process(zoo, demo_manifest, expected, tmp_path):
    parts, single, single_counts = expected
    out = tmp_path / "s"
    p = _cache_ray(zoo, demo_manifest, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_store(parts, out)  # byte-equal to what the local copies write
    store = TeacherStore(out)
    assert [q.name for q in store.parts] == ["shard-00000-of-00002", "shard-00001-of-00002"] and verify(store).ok
    _assert_same_samples(store, TeacherStore(single))
    counts = json.loads((tmp_path / "s.json").read_text())  # summed over the tasks
    assert (counts["samples"], counts["rejects"], counts["reject_reasons"]) == (
        single_counts.samples, single_counts.rejects, single_counts.reject_reasons)
    assert "Traceback" not in p.stderr and "raylet" not in p.stdout + p.stderr, p.stderr[-3000:]  # Ray kept quiet


@needs_ray
@pytest.mark.slow  # README "Reliability and tests": what make test covers of it
def test_a_killed_part_is_rerun_by_ray_and_resumes(zoo, demo_manifest, expected, tmp_path):
    """Each task's job is SIGKILLed once, right after its commit 1; Ray re-runs it, it resumes after that commit."""
    out = tmp_path / "s"
    p = _cache_ray(zoo, demo_manifest, out, GENRECAL_KILL_AT="committed:1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_store(expected[0], out)
    root = TeacherStore(out).path / "parts"
    for part in ("shard-00000-of-00002", "shard-00001-of-00002"):  # each writer records itself when it opens
        attrs = json.loads((root / part / "zarr.json").read_text())["attributes"]
        assert len(attrs["provenance"]) == 2, part
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == 12  # commits 0 and 1: 6 rows per part


@needs_ray
@pytest.mark.slow
def test_a_part_that_keeps_crashing_fails_after_its_retries_and_is_named(zoo, demo_manifest, expected, tmp_path):
    """Rendering row 5 kills part 1's job every time: after --ray-retries 1 it is reported, part 0 is complete."""
    out = tmp_path / "s"
    p = _cache_ray(zoo, demo_manifest, out, "--ray-retries", "1", GENRECAL_KILL_AT="render-row-5")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "error: part 1/2 (killed by signal 9 on " in p.stderr and "Re-run the same command" in p.stderr
    assert "part 0/2" not in p.stderr and "Traceback" not in p.stderr
    store, want = TeacherStore(out), TeacherStore(expected[0])
    assert store.parts[0].samples.equals(want.parts[0].samples) and len(store.parts[1]) == 0
    attrs = json.loads((out / "parts" / "shard-00001-of-00002" / "zarr.json").read_text())["attributes"]
    assert len(attrs["provenance"]) == 2  # run once, re-run once


def test_without_ray_installed_the_error_names_the_extra(tmp_path, monkeypatch):
    from genrecal_cache.job.ray_launch import run_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = CacheConfig(teacher="t", manifest="m", output=tmp_path / "s", ray=True, data_parallel_size=2,
                      command=["test"], **OPTIONS)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]'"):
        run_ray(cfg)
    with pytest.raises(ConfigError, match="--ray-address is for --ray"):
        CacheConfig(teacher="t", manifest="m", output=tmp_path / "s", ray_address="local")


def test_relative_paths_reach_every_node_absolute(zoo, tmp_path, monkeypatch):
    """A task runs in its node's own working folder: the driver sends absolute paths (hub ids stay as they are)."""
    from genrecal_cache.job.ray_launch import _absolute

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = _absolute(CacheConfig(teacher=str(zoo["textlm"]), manifest="data/rows.jsonl", output="stores/s",
                                image_root="data", command=["t"]))
    assert cfg.manifest == str(tmp_path / "data" / "rows.jsonl") and cfg.output == tmp_path / "stores" / "s"
    assert cfg.image_root == tmp_path / "data"
    assert _absolute(CacheConfig(teacher="org/model", manifest="hub:org/set", output="s", command=["t"])
                     ).manifest == "hub:org/set"
