"""cache-teacher killed (SIGKILL) or out of disk at many points, alone or beside a second writer: re-running the
same command gives the store an uninterrupted run gives; nothing lost, nothing duplicated."""

from __future__ import annotations

import subprocess

import pytest

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify
from tests.cache.job.test_cache_teacher import assert_same_store
from tests.helpers import start_command

KILL_POINTS = ["array-write:0:token_ids", "array-write:1:features", "array-write:2:question_features",
               "arrays-written:1", "rejects-written:2", "committed:0", "committed:3"]

pytestmark = pytest.mark.reliability


def _run(zoo, manifest, out, shard="0/1", **faults) -> subprocess.Popen:
    """Started, not waited on (two writers race); no fault but those `faults` gives."""
    return start_command("cache-teacher", "--teacher", zoo["qwen2vl"], "--manifest", manifest, "--output", out,
                         "--commit-every", "3", "--batch-tokens", "200", "--dtype", "float32", "--device", "cpu",
                         "--question-features", "--shard", shard, "--no-progress",
                         env={"OMP_NUM_THREADS": "1", **faults},
                         drop_env=("GENRECAL_KILL_AT", "GENRECAL_ENOSPC_AT", "GENRECAL_ENOSYS_AT", "GENRECAL_HOLD_AT"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_here(zoo, manifest, out, shard="0/1") -> None:
    """`_run`'s job uninterrupted, in this process: the reference stores (rendered here, which writes the same
    store as render workers do: tests/cache/data/test_render_workers.py)."""
    run_cache(CacheConfig(teacher=str(zoo["qwen2vl"]), manifest=manifest, output=out, commit_every=3,
                          batch_tokens=200, dtype="float32", device="cpu", question_features=True, shard=shard,
                          render_workers=0, progress=False, command=["test"]))


def _done(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate(timeout=600)
    return p.returncode, err


@pytest.fixture(scope="module")
def reference(zoo, demo_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "s"
    _run_here(zoo, demo_manifest, out)
    return out


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_anywhere_then_rerun_equals_uninterrupted(zoo, demo_manifest, reference, tmp_path, point):
    out = tmp_path / "s"
    rc, err = _done(_run(zoo, demo_manifest, out, GENRECAL_KILL_AT=point))
    assert rc == -9, f"the kill point {point} was never reached: {err[-1000:]}"
    rc, err = _done(_run(zoo, demo_manifest, out))
    assert rc == 0, err[-2000:]
    assert_same_store(reference, out)
    assert verify(TeacherStore(out)).ok


def test_sigkill_while_a_commit_is_written_and_the_next_is_queued(zoo, demo_manifest, reference, tmp_path):
    """The writer thread holds in the middle of commit 1 (its token ids written, its features not) while the job
    goes on and queues commit 2; the job is killed then. Only commit 0 is on record, and the re-run completes the
    store byte-equal to an uninterrupted run."""
    out = tmp_path / "s"
    rc, err = _done(_run(zoo, demo_manifest, out, GENRECAL_HOLD_AT="array-write:1:features",
                         GENRECAL_KILL_AT="commit-queued:2"))
    assert rc == -9, f"commit 2 was never queued: {err[-1000:]}"
    assert [f.name for f in sorted((out / "parts/shard-00000-of-00001/samples").glob("*.parquet"))] == [
        "00000000.parquet"]
    assert TeacherStore(out).parts[0].commit["rows_end"] < TeacherStore(reference).parts[0].commit["rows_end"]
    rc, err = _done(_run(zoo, demo_manifest, out))
    assert rc == 0, err[-2000:]
    assert_same_store(reference, out)
    assert verify(TeacherStore(out)).ok


def test_two_writers_one_killed_and_restarted(zoo, demo_manifest, tmp_path):
    ref = tmp_path / "ref"
    for shard in ("0/2", "1/2"):
        _run_here(zoo, demo_manifest, ref, shard)
    out = tmp_path / "s"
    a = _run(zoo, demo_manifest, out, "0/2")
    b = _run(zoo, demo_manifest, out, "1/2", GENRECAL_KILL_AT="array-write:1:features")
    assert _done(b)[0] == -9
    assert _done(a)[0] == 0
    rc, err = _done(_run(zoo, demo_manifest, out, "1/2"))
    assert rc == 0, err[-2000:]
    assert_same_store(ref, out)


def test_out_of_disk_stops_cleanly_keeps_the_store_and_resumes(zoo, demo_manifest, reference, tmp_path):
    out = tmp_path / "s"
    rc, err = _done(_run(zoo, demo_manifest, out, GENRECAL_ENOSPC_AT="array-write:2:features"))
    assert rc == 2 and "out of disk space" in err and "re-run the same command" in err, err[-2000:]
    assert "Traceback" not in err
    partial = TeacherStore(out)
    # commit 2 failed on the writer thread: the message names what is on disk, not what the job had handed over
    kept = partial.parts[0].commit["rows_end"]
    assert f"everything up to commit 1 is kept (manifest rows < {kept})" in err, err[-2000:]
    assert 0 < len(partial) < len(TeacherStore(reference)) and verify(partial, allow_partial=True).ok  # intact
    rc, err = _done(_run(zoo, demo_manifest, out))
    assert rc == 0, err[-2000:]
    assert_same_store(reference, out)


def test_a_file_system_without_locks_is_refused_naming_the_fix(zoo, demo_manifest, tmp_path):
    """flock failing with ENOSYS (Lustre mounted without -o flock): one writer per part cannot be guaranteed, so
    nothing is written, and the message says which file systems do."""
    rc, err = _done(_run(zoo, demo_manifest, tmp_path / "s", GENRECAL_ENOSYS_AT="flock"))
    assert rc == 2 and "does not support file locks" in err and "-o flock" in err, err[-2000:]
    assert "Traceback" not in err


CORRUPTIONS = {
    "truncated chunk": lambda d: _truncate(d / "parts/shard-00000-of-00001/features/c/0/0"),
    "flipped byte": lambda d: _flip(d / "parts/shard-00000-of-00001/topk_ids/c/0/0"),
    "deleted shard": lambda d: (d / "parts/shard-00000-of-00001/targets/c/0").unlink(),
    "removed samples file": lambda d: sorted((d / "parts/shard-00000-of-00001/samples").glob("*.parquet"))[1].unlink(),
    "removed rejects file": lambda d: _remove_nonempty_rejects(d),
    "attributes of another teacher": lambda d: _edit_teacher(d),
}


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x10
    f.write_bytes(bytes(b))


def _remove_nonempty_rejects(d):
    import pyarrow.parquet as pq

    files = sorted((d / "parts/shard-00000-of-00001/rejects").glob("*.parquet"))
    next(f for f in files if pq.read_table(f).num_rows).unlink()


def _edit_teacher(d):
    import json

    meta = json.loads((d / "zarr.json").read_text())
    meta["attributes"]["genrecal"]["teacher"]["head_digest"] = "0" * 64
    meta["attributes"]["genrecal"]["teacher"]["name_or_path"] = "another/teacher"
    (d / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corruption_is_named_by_verify_and_refused_by_train_student(zoo, reference, tmp_path, damage):
    import shutil

    from genrecal_cache.core.errors import StoreError
    from genrecal_cache.store.verify import format_verify
    from genrecal_train.config import TrainConfig
    from genrecal_train.trainer import Trainer

    store = tmp_path / "s"
    shutil.copytree(reference, store)
    CORRUPTIONS[damage](store)
    report = verify(TeacherStore(store))
    assert not report.ok, damage
    where = report.failures[0]
    assert where["part"] and where["array"] and where["message"]
    text = format_verify(report)
    cfg = TrainConfig(store=store, student=str(zoo["idefics3"]), output=tmp_path / "o", progress=False,
                      device="cpu", verify_store=True, command=["t"])
    with pytest.raises(StoreError) as err:
        Trainer(cfg, 1)
    assert "not training on it" in str(err.value) and text.splitlines()[1] in str(err.value)


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_without_full_verification_damage_is_refused_at_start_or_stops_the_first_read(zoo, reference, tmp_path,
                                                                                     damage):
    import shutil

    from genrecal_cache.core.errors import StoreError
    from genrecal_train.config import TrainConfig
    from genrecal_train.trainer import Trainer

    store = tmp_path / "s"
    shutil.copytree(reference, store)
    CORRUPTIONS[damage](store)
    cfg = TrainConfig(store=store, student=str(zoo["idefics3"]), output=tmp_path / "o", progress=False,
                      device="cpu", heldout_fraction=0.0, reliance_every=0, block_size=64, command=["t"])
    with pytest.raises(StoreError, match="damaged"):
        Trainer(cfg, 1).run()  # the quick check at start, or the checksum at the first read of the chunk
    assert not (tmp_path / "o" / "stage1" / "final").exists()
