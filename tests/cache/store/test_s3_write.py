"""Writing a store to object storage (issue 23): `cache-teacher --output s3://…` against a real S3 server (SeaweedFS,
the `s3_server` fixture), through the console commands: the same bytes as the same job written locally, a SIGKILL
after the second commit resumed byte-equal, one writer per part by its lease, server failures as one line with
the job resumable, damage named by --verify and refused by train-student."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from s3server import S3Server

from genrecal_cache.core.errors import StoreError
from genrecal_cache.core.locations import Location
from genrecal_cache.store.lease import Lease, LeaseHeldError, lease_state
from genrecal_cache.store.reader import TeacherStore
from tests.helpers import run_command, same_store, start_command

ENV = {"OMP_NUM_THREADS": "1"}
DROP = ("GENRECAL_KILL_AT", "GENRECAL_HOLD_AT", "GENRECAL_WAIT_AT")
PART = "shard-00000-of-00001"


def _args(zoo, manifest, out, *flags):
    return ("--teacher", zoo["llava"], "--manifest", manifest, "--output", out, "--dtype", "float32", "--device",
            "cpu", "--no-progress", "--max-samples", "8", "--commit-every", "2", "--question-features", *flags)


def _cache(zoo, manifest, out, *flags, env=None):
    return run_command("cache-teacher", *_args(zoo, manifest, out, *flags), env=env or ENV, drop_env=DROP,
                       timeout=600)


def _start(zoo, manifest, out, *flags, env=None) -> subprocess.Popen:
    return start_command("cache-teacher", *_args(zoo, manifest, out, *flags), env=env or ENV, drop_env=DROP,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(s3_server, tmp_path: Path, **extra: str) -> dict:
    return {**ENV, **s3_server.env(), "XDG_CACHE_HOME": str(tmp_path / "cache"), **extra}


def _url(s3_server, name: str) -> str:
    return s3_server.url(f"{name}-{uuid.uuid4().hex[:8]}", "store")


def _rows_end(url: str, server) -> int:
    """The manifest row the last commit of the store's part resumes from."""
    part = TeacherStore(url, storage_options=server.storage_options()).parts[0]
    return part.commits[max(part.commits)]["rows_end"]


@pytest.fixture(scope="module")
def local(zoo, demo_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s3write") / "local"
    done = _cache(zoo, demo_manifest, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def written(zoo, demo_manifest, local, s3_server, tmp_path_factory) -> str:
    """The same job with --output s3://…, uninterrupted."""
    url = _url(s3_server, "written")
    done = _cache(zoo, demo_manifest, url, env=_env(s3_server, tmp_path_factory.mktemp("env")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"-> {url}" in done.stdout
    return url


def test_a_store_written_to_s3_is_the_local_store_verifies_and_trains(written, local, zoo, s3_server, tmp_path):
    same_store(local, written, s3_server)
    loc = Location.of(written, s3_server.storage_options())
    assert not loc.join("parts", PART, "lease.json").exists() and not loc.join("create.lease.json").exists()
    env = _env(s3_server, tmp_path)
    done = run_command("inspect-cache", "--store", written, "--verify", env=env, timeout=600)
    assert done.returncode == 0 and "verify: OK" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "verify: 100%" in done.stderr  # the progress bar over the samples
    train = ("--student", zoo["qwen2vl"], "--stage", "1", "--max-steps", "2", "--batch-size", "2", "--block-size",
             "2", "--heldout-fraction", "0", "--reliance-every", "0", "--report-to", "none", "--device", "cpu",
             "--no-progress")
    done = run_command("train-student", "--store", written, "--output", tmp_path / "run", *train, env=env,
                       timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # The recorded job repeats itself: configs/<part>.yaml is in the bucket, credentials not in it.
    config = loc.join("configs", f"{PART}.yaml").read_bytes().decode()
    assert f"output: {written}" in config and s3_server.secret_key not in config


def test_a_flipped_byte_in_a_written_shard_is_named_and_training_refuses(written, zoo, s3_server, tmp_path):
    url, env = _url(s3_server, "flip"), _env(s3_server, tmp_path)
    src, dst = (Location.of(u, s3_server.storage_options()) for u in (written, url))
    src.fs.copy(src.path + "/", dst.path + "/", recursive=True)
    shard = Location.of(url, s3_server.storage_options()).join("parts", PART, "features", "c", "0", "0")
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = run_command("inspect-cache", "--store", url, "--verify", env=env, timeout=600)
    assert done.returncode == 1 and f"part {PART}, array features, samples 0.." in done.stdout, done.stdout[-2000:]
    done = run_command("train-student", "--store", url, "--student", zoo["qwen2vl"], "--output", tmp_path / "run",
                       "--max-steps", "2", "--batch-size", "2", "--report-to", "none", "--device", "cpu",
                       "--no-progress", env=env, timeout=900)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "features" in done.stderr and "verify" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("point", ["committed:1", "arrays-written:2"])
def test_sigkill_after_the_second_commit_then_rerun_is_byte_equal(written, zoo, demo_manifest, s3_server, tmp_path,
                                                                   point):
    """Killed once commit 1 is on record, or with commit 2's shards written and its samples table not yet (shard
    objects past the committed lengths, cut off by the re-run)."""
    url, env = _url(s3_server, "killed"), _env(s3_server, tmp_path)
    done = _cache(zoo, demo_manifest, url, env={**env, "GENRECAL_KILL_AT": point})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    part = Location.of(url, s3_server.storage_options()).join("parts", PART)
    held = lease_state(part.join("lease.json"))
    assert held is not None and held["expires"] > time.time()  # a dead writer's lease, not expired
    rows_end = _rows_end(url, s3_server)
    done = _cache(zoo, demo_manifest, url, env=env)  # its holder ran here and is gone: taken over at once
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{rows_end} rows already done" in done.stdout, done.stdout
    same_store(written, url, s3_server)


def test_one_writer_per_part_then_a_resume_after_the_first_is_killed(written, zoo, demo_manifest, s3_server,
                                                                      tmp_path):
    url, env, go = _url(s3_server, "two"), _env(s3_server, tmp_path), tmp_path / "go"
    first = _start(zoo, demo_manifest, url, env={**env, "GENRECAL_WAIT_AT": f"committed:0={go}"})
    try:
        deadline = time.time() + 300
        while not go.with_name("go.reached").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.2)
        second = _cache(zoo, demo_manifest, url, env=env)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        line = next(x for x in second.stderr.splitlines() if x.startswith("error:"))
        assert f"another cache-teacher is writing part {PART} of {url}" in line and "--take-over-lease" in line
        assert f"pid {first.pid}" in line
    finally:
        first.kill()
        first.communicate()
    done = _cache(zoo, demo_manifest, url, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    same_store(written, url, s3_server)


def test_a_lease_expires_renews_and_can_be_taken_over(s3_server):
    """In process, against the server: a holder that stops renewing (a dead job on another machine) blocks the part
    until its lease expires; then the next writer takes it, and the old holder finds out before its next commit;
    --take-over-lease takes it at once."""
    loc = Location.of(_url(s3_server, "lease"), s3_server.storage_options()).join("lease.json")
    a = Lease(loc, "part p", seconds=4).acquire()
    first = lease_state(loc)
    time.sleep(1.5)
    assert lease_state(loc)["expires"] > first["expires"]  # renewed every second
    with pytest.raises(LeaseHeldError, match=r"lease .* runs \d+ s more"):
        Lease(loc, "part p", seconds=4).acquire()
    a._stop.set()  # the holder stops renewing, as a killed job elsewhere would (alive here: not taken as dead)
    a._thread.join()
    time.sleep(max(0.0, lease_state(loc)["expires"] - time.time()) + 0.2)
    b = Lease(loc, "part p", seconds=4).acquire()
    with pytest.raises(StoreError, match="lost its lease"):
        a.check()
    c = Lease(loc, "part p", seconds=60, take_over=True).acquire()
    assert lease_state(loc)["owner"] == c.owner
    with pytest.raises(StoreError, match="lost its lease"):
        b.check()
    for lease in (a, b):
        lease.release()
    assert lease_state(loc)["owner"] == c.owner  # a lost lease is not deleted by its old holder
    c.release()
    assert lease_state(loc) is None


def test_server_failures_are_one_line_and_the_job_resumes(local, zoo, demo_manifest, s3_server, tmp_path):
    env = _env(s3_server, tmp_path)
    url = _url(s3_server, "fail")
    wrong = _cache(zoo, demo_manifest, url, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr[-2000:]
    lines = [x for x in wrong.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {url}") and "access denied" in lines[0], lines
    missing = _cache(zoo, demo_manifest, "s3://no-such-bucket/store", env=env)
    assert missing.returncode == 2 and "'no-such-bucket' does not exist" in missing.stderr, missing.stderr[-2000:]
    # A server of its own, stopped while the job waits after its first commit, then started again.
    (tmp_path / "server").mkdir()
    with S3Server(tmp_path / "server", bucket="short") as server:
        url, go = server.url("store"), tmp_path / "go"
        opts = json.dumps(server.storage_options(config_kwargs={"retries": {"max_attempts": 1}}))
        senv = {**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        job = _start(zoo, demo_manifest, url, "--storage-options", opts,
                     env={**senv, "GENRECAL_WAIT_AT": f"arrays-written:1={go}"})
        deadline = time.time() + 300
        while not go.with_name("go.reached").exists():
            assert job.poll() is None and time.time() < deadline, job.communicate()[1][-2000:]
            time.sleep(0.2)
        server.stop(grace=1)
        go.touch()
        _, err = job.communicate(timeout=300)
        assert job.returncode == 2 and "Traceback" not in err, err[-3000:]
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "cannot reach the server" in lines[0] and server.endpoint in lines[0], err[-2000:]
        assert "everything up to commit 0 is kept" in lines[0].lower() and "re-run the same command" in lines[0]
        server.start()
        rows_end = _rows_end(url, server)
        done = run_command("cache-teacher", *_args(zoo, demo_manifest, url, "--storage-options", opts), env=senv,
                           drop_env=DROP, timeout=600)
        assert done.returncode == 0 and f"{rows_end} rows already done" in done.stdout, done.stderr[-2000:]
        store = TeacherStore(url, storage_options=server.storage_options())
        ref = TeacherStore(local)
        assert store.parts[0].samples.drop(["images"]).equals(ref.parts[0].samples.drop(["images"]))
        for name in ref.parts[0].specs:
            assert (store.parts[0].array(name)[...] == ref.parts[0].array(name)[...]).all(), name


def test_a_manifest_and_its_images_on_s3_give_the_local_store(local, zoo, demo_manifest, s3_server, tmp_path):
    """The demo manifest and its image folder uploaded: --manifest s3://.../manifest.jsonl (images by paths relative
    to it) writes the store the local files write, the samples naming their images by URL; eval-student reads it
    as it reads the local files."""
    data = Location.of(_url(s3_server, "data"), s3_server.storage_options())
    data.fs.put(str(demo_manifest.parent) + "/", data.path + "/", recursive=True)
    url = _url(s3_server, "from-s3")
    done = _cache(zoo, f"{data.url}/manifest.jsonl", url, env=_env(s3_server, tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    same_store(local, url, s3_server, where_from_differs=True)
    part = TeacherStore(url, storage_options=s3_server.storage_options()).parts[0]
    paths = [p for ps in part.samples.column("image_paths").to_pylist() for p in ps if p]
    assert paths and all(p.startswith(f"{data.url}/images/") for p in paths), paths[:3]
    # eval-student reads the same data from S3 as from the local files: the same predictions
    preds = {}
    for name, manifest in (("local", demo_manifest), ("s3", f"{data.url}/manifest.jsonl")):
        done = run_command("eval-student", "--student", zoo["qwen2vl"], "--manifest", manifest, "--max-samples",
                           "4", "--max-new-tokens", "3", "--output", tmp_path / f"{name}.jsonl", "--device", "cpu",
                           "--no-progress", env=_env(s3_server, tmp_path), timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        preds[name] = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert preds["s3"] == preds["local"] and len(preds["local"]) >= 3
    # A path that leaves the image root is refused, as locally
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "images": ["../../elsewhere/a.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": "a"}]}) + "\n")
    data.join("bad.jsonl").write_bytes(bad.read_bytes())
    done = _cache(zoo, f"{data.url}/bad.jsonl", _url(s3_server, "bad"), env=_env(s3_server, tmp_path))
    assert done.returncode == 2 and "outside the image root" in done.stdout + done.stderr, done.stderr[-2000:]


def test_a_server_without_conditional_writes_is_refused_unless_the_user_opts_in():
    """fsspec's in-memory filesystem stands for a server that has no conditional writes (the probe says so): the
    writer refuses it in one line naming the opt-in; with it, the part's files write by plain PUTs, the lease still
    naming its holder."""
    from genrecal_cache.store.part_files import ObjectPartFiles, part_files

    root = Location.of(f"memory://bucket-{uuid.uuid4().hex[:8]}/store")
    assert not root.supports_conditional_writes()
    with pytest.raises(StoreError, match="ignores conditional writes .* --allow-unconditional-writes"):
        part_files(root, PART)
    files = part_files(root, PART, lease_seconds=8, unconditional=True)
    assert isinstance(files, ObjectPartFiles) and not files.conditional
    files.acquire()
    assert lease_state(files.dir.join("lease.json"))["pid"] == os.getpid()
    files.release()
    assert lease_state(files.dir.join("lease.json")) is None
