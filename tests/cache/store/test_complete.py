"""Complete stores only: every part the store declares (`num_shards`) is there and finished (its last commit's
rows_end reaches rows_total), or `inspect-cache --verify` names what is missing and `train-student` refuses the
store unless --allow-partial, which the run's config records."""

from __future__ import annotations

import pyarrow.parquet as pq

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.format import SAMPLES_DIR
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify
from tests.helpers import run_command

ENV, DROP = {"OMP_NUM_THREADS": "1"}, ("GENRECAL_KILL_AT",)


def _cache(zoo, manifest, out, *flags: str, env: dict | None = None):
    return run_command("cache-teacher", "--teacher", zoo["llava"], "--manifest", manifest, "--output", out,
                       "--dtype", "float32", "--device", "cpu", "--no-progress", "--max-samples", "6", *flags,
                       env={**ENV, **(env or {})}, drop_env=DROP, timeout=600)


def _cache_here(zoo, manifest, out, **options):
    """`_cache` in this process, for stores that are a test's data (not the command under test)."""
    res = run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=manifest, output=out, dtype="float32",
                                device="cpu", progress=False, max_samples=6, render_workers=0, command=["test"],
                                **options))
    assert res.samples > 0, res.top_reasons(5)


def _train(store, student, out, *flags: str):
    return run_command("train-student", "--store", store, "--student", student, "--output", out, "--stage", "1",
                       "--max-steps", "1", "--batch-size", "2", "--heldout-fraction", "0", "--reliance-every", "0",
                       "--report-to", "none", "--device", "cpu", "--no-progress", *flags, env=ENV, drop_env=DROP,
                       timeout=900)


def test_a_store_missing_a_part_fails_verify_and_is_not_trained_on_unless_allowed(zoo, clean_manifest, tmp_path):
    out = tmp_path / "s"
    _cache_here(zoo, clean_manifest, out, shard="0/2")
    v = run_command("inspect-cache", "--store", out, "--verify", env=ENV, timeout=600)
    assert v.returncode == 1 and "verify: FAILED" in v.stdout, v.stdout[-2000:]  # before: verify OK
    assert "part shard-00001-of-00002 is missing" in v.stdout and "--shard 1/2" in v.stdout
    assert "INCOMPLETE" in v.stdout  # the summary says it too

    refused = _train(out, zoo["qwen2vl"], tmp_path / "run")
    assert refused.returncode == 2, refused.stderr[-2000:]  # before: trained, exit 0
    assert "shard-00001-of-00002 is missing" in refused.stderr and "--allow-partial" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "run" / "stage1").exists()

    allowed = _train(out, zoo["qwen2vl"], tmp_path / "run", "--allow-partial")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "training on an incomplete store" in allowed.stderr and "shard-00001-of-00002" in allowed.stderr
    assert "allow_partial: true" in (tmp_path / "run" / "config.yaml").read_text()

    _cache_here(zoo, clean_manifest, out, shard="1/2")  # the missing part written: whole
    v = run_command("inspect-cache", "--store", out, "--verify", env=ENV, timeout=600)
    assert v.returncode == 0 and "INCOMPLETE" not in v.stdout, v.stdout[-2000:]


def test_an_unfinished_part_is_named_until_its_job_is_re_run(zoo, clean_manifest, tmp_path):
    out = tmp_path / "s"
    killed = _cache(zoo, clean_manifest, out, "--commit-every", "2", env={"GENRECAL_KILL_AT": "committed:0"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # one commit of rows < 2, then killed
    store = TeacherStore(out)
    problems, _ = store.completeness()
    assert problems == [("shard-00000-of-00001", "part shard-00000-of-00001 is unfinished: manifest rows < 2 of 6 "
                                                 "done; re-run its cache-teacher command to finish it")]
    rep = verify(store, full=False)
    assert not rep.ok and rep.failures[0]["part"] == "shard-00000-of-00001"
    assert verify(store, full=False, allow_partial=True).ok  # --allow-partial: a warning
    assert _cache(zoo, clean_manifest, out, "--commit-every", "2").returncode == 0
    assert TeacherStore(out).completeness() == ([], []) and verify(TeacherStore(out)).ok


def test_parts_written_before_commits_recorded_rows_total_are_not_judged(zoo, clean_manifest, tmp_path):
    out = tmp_path / "s"
    _cache_here(zoo, clean_manifest, out)
    for f in (out / "parts" / "shard-00000-of-00001" / SAMPLES_DIR).glob("*.parquet"):  # as older GenRecal wrote
        table = pq.read_table(f)
        meta = table.schema.metadata
        commit = meta[b"genrecal_commit"].decode().replace(', "rows_total": 6', "")
        assert "rows_total" not in commit
        pq.write_table(table.replace_schema_metadata({**meta, b"genrecal_commit": commit.encode()}), f)
    store = TeacherStore(out)
    problems, notes = store.completeness()
    assert problems == [] and "records no manifest row count" in notes[0]
    rep = verify(store)
    assert rep.ok and any("not checked" in w for w in rep.warnings)
