"""Reading a store from object storage (issue 23, the read side): a store written locally by cache-teacher is
uploaded to a real S3 server (SeaweedFS, the `s3_server` fixture) and read there through the console commands:
inspect-cache (summary, --json, --verify, --sample, --progress) and train-student, against the same commands on the local copy;
a flipped byte, wrong credentials, a missing bucket or store and a stopped server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from s3server import S3Server

from genrecal_cache.core.locations import Location
from tests.helpers import run_command

ENV, DROP = {"OMP_NUM_THREADS": "1"}, ("GENRECAL_KILL_AT",)
PART = "shard-00000-of-00001"


def _upload(s3_server, local: Path, name: str) -> str:
    url = s3_server.url(f"{name}-{uuid.uuid4().hex[:8]}", "store")
    loc = Location.of(url, s3_server.storage_options())
    loc.fs.put(str(local) + "/", loc.path + "/", recursive=True)
    assert loc.join("zarr.json").exists() and loc.join("parts", PART, "zarr.json").exists()
    return url


@pytest.fixture(scope="module")
def stores(zoo, clean_manifest, s3_server, tmp_path_factory) -> dict:
    """One tiny store written by cache-teacher (6 rows, commits of 2), and its copy in the bucket."""
    local = tmp_path_factory.mktemp("s3read") / "store"
    done = run_command("cache-teacher", "--teacher", zoo["llava"], "--manifest", clean_manifest, "--output", local,
                       "--dtype", "float32", "--device", "cpu", "--no-progress", "--max-samples", "6",
                       "--commit-every", "2", env=ENV, drop_env=DROP, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"local": local, "url": _upload(s3_server, local, "read")}


def _env(s3_server, tmp_path: Path, **extra: str) -> dict:
    # Its own cache folder: the remote tokenizer is copied there, not into the user's.
    return {**ENV, **s3_server.env(), "XDG_CACHE_HOME": str(tmp_path / "cache"), **extra}


def _inspect(store, *flags, env=None):
    return run_command("inspect-cache", "--store", store, *flags, env=env or ENV, drop_env=DROP, timeout=600)


def test_inspect_verify_json_and_sample_read_the_same_from_s3(stores, s3_server, tmp_path):
    env = _env(s3_server, tmp_path)
    local, remote = (json.loads(_inspect(s, "--verify", "--json", env=env).stdout) for s in (stores["local"],
                                                                                              stores["url"]))
    assert local["summary"].pop("path") == str(stores["local"]) and remote["summary"].pop("path") == stores["url"]
    assert remote == local and remote["verify"]["ok"] and remote["summary"]["samples"] > 0
    text = _inspect(stores["url"], "--verify", env=env)
    assert text.returncode == 0 and "verify: OK" in text.stdout, text.stderr[-2000:]
    assert f"samples          {local['summary']['samples']}  (rejects {local['summary']['rejects']})" in text.stdout
    first = _first_id(stores["local"])
    views = [_inspect(s, "--sample", first, env=env) for s in (stores["local"], stores["url"])]
    assert all(v.returncode == 0 for v in views), views[1].stderr[-2000:]
    assert views[0].stdout == views[1].stdout  # tokens decoded with the store's tokenizer (copied from S3)
    local, remote = (_inspect(s, "--progress", "--json", env=env) for s in (stores["local"], stores["url"]))
    assert remote.returncode == 0, remote.stderr[-2000:]
    (local,), (remote,) = (json.loads(p.stdout) for p in (local, remote))
    assert remote.pop("last_commit_age_s") > 0 and local.pop("last_commit_age_s") > 0  # the rest: commit records
    assert remote == local and remote["commits"] > 0 and remote["rows_end"] == remote["rows_total"] > 0
    assert remote["bytes"] > 0 and remote["projected_bytes"] == remote["bytes"]
    text = _inspect(stores["url"], "--progress", env=env)
    assert text.returncode == 0 and PART in text.stdout and "done" in text.stdout, text.stderr[-2000:]


def _first_id(store: Path) -> str:
    from genrecal_cache.store.reader import TeacherStore

    return TeacherStore(store).parts[0].samples.column("sample_id")[0].as_py()


def test_a_flipped_byte_in_a_shard_object_is_named_by_verify(stores, s3_server, tmp_path):
    url = _upload(s3_server, stores["local"], "flipped")
    shard = Location.of(url, s3_server.storage_options()).join("parts", PART, "features", "c", "0", "0")
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = _inspect(url, "--verify", env=_env(s3_server, tmp_path))
    assert done.returncode == 1 and "verify: FAILED" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"part {PART}, array features, samples 0.." in done.stdout and "Traceback" not in done.stderr


def _train(store, student, out, *flags, env=None):
    return run_command("train-student", "--store", store, "--student", student, "--output", out, "--stage", "1",
                       "--max-steps", "2", "--batch-size", "2", "--block-size", "2", "--heldout-fraction", "0",
                       "--reliance-every", "0", "--log-every", "1", "--report-to", "none", "--device", "cpu",
                       "--no-progress", *flags, env=env or ENV, drop_env=DROP, timeout=900)


def _losses(out: Path) -> list:
    recs = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_train_student_from_s3_has_the_local_losses(stores, zoo, s3_server, tmp_path):
    env = _env(s3_server, tmp_path)
    runs = {}
    for name, store, flags in [("local", stores["local"], ()), ("s3", stores["url"], ()),
                               ("s3-worker", stores["url"], ("--num-workers", "1"))]:
        done = _train(store, zoo["qwen2vl"], tmp_path / name, *flags, env=env)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        runs[name] = _losses(tmp_path / name)
    assert len(runs["local"]) == 2 and runs["s3"] == runs["local"] and runs["s3-worker"] == runs["local"], runs


def _one_line_error(done, url: str, *needles: str) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {url}"), done.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_wrong_credentials_missing_bucket_or_store_are_one_line(stores, zoo, s3_server, tmp_path):
    env = _env(s3_server, tmp_path)
    wrong = _inspect(stores["url"], env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    _one_line_error(wrong, stores["url"], "access denied", "AWS_ACCESS_KEY_ID")
    missing = "s3://no-such-bucket/store"
    _one_line_error(_inspect(missing, env=env), missing, "'no-such-bucket' does not exist", s3_server.endpoint)
    nothing = s3_server.url("nothing-here", "store")
    _one_line_error(_inspect(nothing, env=env), nothing, "no teacher store")
    # train-student the same, with the credentials given as --storage-options instead of the environment
    opts = json.dumps(s3_server.storage_options(secret="wrong"))
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    done = _train(stores["url"], zoo["qwen2vl"], tmp_path / "run", "--storage-options", opts, env=bare)
    _one_line_error(done, stores["url"], "access denied")
    assert not (tmp_path / "run" / "stage1").exists()


def test_a_stopped_server_is_one_line(tmp_path):
    """A second, short-lived server, stopped: nothing answers at its endpoint (the session's server stays up)."""
    (tmp_path / "server").mkdir()
    server = S3Server(tmp_path / "server", bucket="short").start()
    server.stop(grace=1)
    url = server.url("store")
    opts = json.dumps(server.storage_options(config_kwargs={"retries": {"max_attempts": 1}}))
    done = _inspect(url, "--storage-options", opts, env={**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    line = _one_line_error(done, url, "cannot reach the server", server.endpoint)  # exit 2, one `error:` line
    assert "verify" not in line and "damaged" not in line  # the server, not the store, is named


def test_secrets_are_masked_where_options_are_recorded_and_urls_keep_their_form():
    from genrecal_cache.core.locations import redact_storage_options, store_path

    text = '{"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://h:1"}, "profile": "p"}'
    masked = json.loads(redact_storage_options(text))
    assert masked == {"key": "***", "secret": "***", "client_kwargs": {"endpoint_url": "http://h:1"}, "profile": "p"}
    assert redact_storage_options(None) is None
    assert store_path("s3://bucket/prefix/store/") == "s3://bucket/prefix/store"  # a Path would fold the //
    assert store_path("file:///data/store") == Path("/data/store") and store_path("rel/store") == Path("rel/store")
