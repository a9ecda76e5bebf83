"""Inputs that used to stall, crash or mislead cache-teacher (issue 22): manifest paths with glob characters,
symlinked sources (the Hugging Face cache layout), a 1 MB non-base64 string, deeply nested JSON, lone surrogates,
stray files in a part, stored image paths that changed, and remote images without limits. Each is a reject with
its reason, or read as the user meant, and never a traceback."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from genrecal_cache.core.errors import ConfigError, RejectError
from genrecal_cache.data.rows import Row, parse_row
from genrecal_cache.data.sources import changed_file, open_source
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from tests.helpers import ROOT, run_command

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
DEEP = 5000  # far past json's (and repr's) recursion limit


def _png(seed: int = 0, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 40 % 256, 90, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _row(sid: str, image: str | None = None, answer: str = "seven", question: str = "What digit?") -> dict:
    user = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    return {"id": sid, "images": [image] if image is not None else [],
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _cache(zoo, manifest, out, *extra) -> subprocess.CompletedProcess:
    return run_command("cache-teacher", "--teacher", zoo["llava"], "--manifest", manifest, "--output", out,
                       "--dtype", "float32", "--device", "cpu", "--no-progress", *extra, env=ENV, timeout=600)


def _cache_here(zoo, manifest, out, **options) -> None:
    """`_cache` in this process, where the store is the test's data and the command is not what it checks."""
    run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=manifest, output=out, dtype="float32", device="cpu",
                          progress=False, render_workers=0, command=["test"], **options))


def _rows(store: Path) -> tuple[list[str], dict[str, str]]:
    s = TeacherStore(store)
    ids = [i for p in s.parts for i in p.samples.column("sample_id").to_pylist()]
    return ids, {r["sample_id"]: r["reason"] for r in s.rejects().to_pylist()}


# --- the glob, nesting, surrogates and a 1 MB non-base64 string: one cache-teacher run ------------------------

def test_hostile_rows_become_rejects_and_a_bracketed_path_is_read_literally(zoo, tmp_path):
    """`exp[1]/train.jsonl` is that file (not the glob matching exp1/train.jsonl); a row nested 5000 deep, an id
    and a text with a lone surrogate and a 1 MB string that is neither a path nor base64 are rejects with their
    reasons; the commit works, and so does the re-run."""
    exp = tmp_path / "exp[1]"
    (exp / "images").mkdir(parents=True)
    (exp / "images" / "0.png").write_bytes(_png(1))
    deep = '{"id": "deep", "messages": ' + "[" * DEEP + "]" * DEEP + "}"
    lines = [json.dumps(_row("g0", "images/0.png")), deep,
             json.dumps(_row("\ud800", "images/0.png")),  # json.dumps writes the escape "\ud800"
             json.dumps(_row("s1", answer="bad \udfff text")),
             json.dumps(_row("b64", " " * 1_000_000 + "!")),
             json.dumps(_row("g1", "images/0.png", answer="three"))]
    manifest = _write_jsonl(exp / "train.jsonl", lines)
    _write_jsonl(tmp_path / "exp1" / "train.jsonl", [json.dumps(_row("decoy", answer="decoy"))])
    r = _cache(zoo, manifest, tmp_path / "s", "--commit-every", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    ids, rejects = _rows(tmp_path / "s")
    assert ids == ["g0", "g1"], ids
    # The nested row cannot be decoded, so its id is unknown: row-<index>. The id with a surrogate is recorded
    # with the surrogate escaped (it cannot be stored as text).
    assert set(rejects) == {"row-1", "\\ud800", "s1", "b64"}, rejects
    assert "nested more than" in rejects["row-1"]
    assert "lone surrogate" in rejects["\\ud800"] and "sample id" in rejects["\\ud800"]
    assert "lone surrogate" in rejects["s1"] and "turn 1" in rejects["s1"]
    assert "not base64" in rejects["b64"]
    r = _cache(zoo, manifest, tmp_path / "s", "--commit-every", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _rows(tmp_path / "s")[0] == ["g0", "g1"]


def test_a_pattern_that_names_no_file_is_still_a_glob(tmp_path):
    for k in (1, 2):
        _write_jsonl(tmp_path / f"exp{k}" / "train.jsonl", [json.dumps(_row(f"r{k}"))])
    src = open_source(str(tmp_path / "exp[12]" / "train.jsonl"))
    assert [r.record["id"] for r in src.rows()] == ["r1", "r2"]
    _write_jsonl(tmp_path / "exp[12]" / "train.jsonl", [json.dumps(_row("literal"))])
    assert [r.record["id"] for r in open_source(str(tmp_path / "exp[12]" / "train.jsonl")).rows()] == ["literal"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_deeply_nested_rows_are_rejects_while_planning_ids_and_parsing(tmp_path, fmt):
    good = _row("g0", answer="seven")
    deep_text = "[" * DEEP + "]" * DEEP
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "m.jsonl", [json.dumps(good), '{"id": "d", "messages": ' + deep_text + "}",
                                                   "[" * DEEP])
    elif fmt == "json":
        path = tmp_path / "m.json"
        path.write_text("[" + json.dumps(good) + ', {"id": "d", "messages": ' + deep_text + "}]")
    else:
        import pyarrow as pa

        path = tmp_path / "m.parquet"
        pq.write_table(pa.Table.from_pylist([{"id": "g0", "messages": json.dumps(good["messages"])},
                                             {"id": "d", "messages": deep_text}]), path)
    src = open_source(path)
    assert len(list(src.ids())) == len(list(src.rows()))  # what plan_ids counts
    rows = list(src.rows())
    assert parse_row(rows[0], tmp_path).sample_id == "g0"
    for row in rows[1:]:
        with pytest.raises(RejectError, match="nested more than"):
            parse_row(row, tmp_path)


def test_lone_surrogates_anywhere_in_a_row_are_rejects(tmp_path):
    (tmp_path / "0.png").write_bytes(_png())
    cases = {"id": _row("\udc80"), "question": _row("q", question="x\ud800"),
             "system": {**_row("s"), "messages": [{"role": "system", "content": "\udfff"}, *_row("s")["messages"]]},
             "renamed": _row("fine")}
    for name, rec in cases.items():
        with pytest.raises(RejectError, match="lone surrogate") as e:
            parse_row(Row(0, rec), tmp_path, sample_id="dup\udc80#2" if name == "renamed" else None)
        e.value.reason.encode("utf-8")  # the reason itself can be stored


def test_base64_is_checked_in_linear_time_at_1_mb(tmp_path):
    """A 1 MB string of whitespace (the quadratic case: ~2 s at 16 kB, hours at 1 MB), and a real 1 MB base64
    image (MIME-wrapped) decoded; in a subprocess with a timeout so a regression cannot hang the suite."""
    big = Image.frombytes("RGB", (600, 600), os.urandom(600 * 600 * 3))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    b64 = base64.encodebytes(buf.getvalue()).decode()  # newline every 76 characters
    assert len(b64) > 1_000_000
    (tmp_path / "good.txt").write_text(b64)
    probe = (
        "import sys; from pathlib import Path\n"
        "from genrecal_cache.core.errors import RejectError\n"
        "from genrecal_cache.data.rows import Row, parse_row\n"
        "def row(img): return Row(0, {'images': [img], 'messages': [{'role': 'user', 'content': '<image>q'},"
        " {'role': 'assistant', 'content': 'a'}]})\n"
        "root = Path(sys.argv[1])\n"
        "for bad in (' ' * 1_000_000 + '!', 'A' * 1_000_000 + '!', '\\n ' * 500_000 + '!', '=' * 1_000_000):\n"
        "    try:\n"
        "        parse_row(row(bad), root)\n"
        "        raise SystemExit('accepted')\n"
        "    except RejectError as e:\n"
        "        assert 'not base64' in e.reason, e.reason\n"
        "s = parse_row(row((root / 'good.txt').read_text()), root)\n"
        "print(s.images[0].load().size)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, **ENV})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(600,", "600)"]


# --- symlinked sources: the Hugging Face cache layout ------------------------------------------------------------

def _hub_cache(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """A dataset as huggingface_hub caches it: snapshots/<rev>/<file> is a relative symlink to blobs/<sha256>."""
    repo = tmp_path / "hub" / "datasets--acme--digits"
    snap = repo / "snapshots" / ("1" * 40)
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return tmp_path / "hub", snap


def _set_blob(snap: Path, name: str, data: bytes) -> None:
    """What a new download of the file does to the cache: the snapshot's link now points at another blob."""
    link = snap / name
    blob = link.resolve().parent / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))


def test_symlinked_files_are_named_by_their_place_in_the_dataset(tmp_path):
    """Two configs' files of the same name are two files; a change to either is seen."""
    a = json.dumps(_row("a0")) + "\n"
    b = json.dumps(_row("b0")) + "\n"
    _, snap = _hub_cache(tmp_path, {"cfg_a/train.jsonl": a.encode(), "cfg_b/train.jsonl": b.encode()})
    before = open_source(snap).identity()
    assert [f["name"] for f in before["files"]] == ["cfg_a/train.jsonl", "cfg_b/train.jsonl"]
    _set_blob(snap, "cfg_a/train.jsonl", (json.dumps(_row("a0", answer="changed")) + "\n").encode())
    why = changed_file(before, open_source(snap).identity())
    assert why is not None and why.startswith("cfg_a/train.jsonl has changed"), why
    # A store written before names kept their folders recorded both as "train.jsonl": still compared file by file.
    legacy = {"files": [{**f, "name": "train.jsonl"} for f in before["files"]]}
    assert changed_file(legacy, before) is None
    why = changed_file(legacy, open_source(snap).identity())
    assert why is not None and why.startswith("cfg_a/train.jsonl has changed"), why


def test_images_under_a_symlinked_root_are_inside_it_and_links_elsewhere_are_not(tmp_path):
    _, snap = _hub_cache(tmp_path, {"images/0.png": _png(1)})
    s = parse_row(Row(0, _row("x", "images/0.png")), snap)
    assert s.images[0].data == _png(1)
    (tmp_path / "outside.png").write_bytes(_png(2))
    (snap / "images" / "evil.png").symlink_to(tmp_path / "outside.png")
    (tmp_path / "hub" / "datasets--acme--digits" / "x.png").write_bytes(_png(3))  # beside blobs/, not in it
    for path in ("images/evil.png", "../../x.png", str(tmp_path / "outside.png")):
        with pytest.raises(RejectError, match="outside the dataset root"):
            parse_row(Row(0, _row("x", path)), snap)
        assert parse_row(Row(0, _row("x", path)), snap, allow_outside_root=True).images
    linked = tmp_path / "linked_root"  # a root that is itself a link
    linked.symlink_to(snap)
    assert parse_row(Row(0, _row("x", "images/0.png")), linked).images[0].data == _png(1)


def test_a_hub_dataset_with_images_caches_and_a_changed_file_is_refused(zoo, tmp_path):
    rows = [_row("h0", "images/0.png"), _row("h1", "images/1.png", answer="three")]
    hub, snap = _hub_cache(tmp_path, {"data/train.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode(),
                                      "images/0.png": _png(1), "images/1.png": _png(2)})
    env = {**ENV, "HF_HUB_CACHE": str(hub)}
    args = ["--teacher", zoo["llava"], "--manifest", "hub:acme/digits", "--output", tmp_path / "s", "--dtype",
            "float32", "--device", "cpu", "--no-progress"]
    r = run_command("cache-teacher", *args, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ids, rejects = _rows(tmp_path / "s")
    assert ids == ["h0", "h1"] and not rejects, rejects
    meta = TeacherStore(tmp_path / "s").meta
    assert [f["name"] for f in meta["source"]["files"]] == ["data/train.jsonl"]
    _set_blob(snap, "data/train.jsonl", (json.dumps(rows[1]) + "\n" + json.dumps(rows[0]) + "\n").encode())
    r = run_command("cache-teacher", *args, env=env, timeout=600)
    assert r.returncode == 2 and "data/train.jsonl has changed since" in r.stderr, r.stderr[-2000:]


# --- a part's stray files, zarr's leftovers, stored image paths --------------------------------------------------

def test_stray_files_in_a_part_are_ignored_and_named_by_verify(zoo, tmp_path):
    """A macOS copy leaves `._00000000.parquet` beside each file; a kill inside a zarr write leaves
    `<chunk>.<uuid>.partial`. Reader, writer (resume) and --progress ignore the first, --verify names it, and the
    writer's recovery removes the second."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(_png(1))
    manifest = _write_jsonl(tmp_path / "m.jsonl", [json.dumps(_row(f"r{i}", "images/0.png")) for i in range(3)])
    out = tmp_path / "s"
    _cache_here(zoo, manifest, out, max_samples=2)
    part = next(p for p in (out / "parts").iterdir() if p.is_dir())
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    for sub in ("samples", "rejects"):
        (part / sub / "._00000000.parquet").write_bytes(apple_double)
    partial = part / "features" / "c" / f"0.{'ab' * 16}.partial"
    partial.write_bytes(b"half a shard")
    store = TeacherStore(out)
    assert len(store) == 2 and store[1].sample_id == "r1"
    r = run_command("inspect-cache", "--store", out, "--verify", env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "verify: OK" in r.stdout and "samples/._00000000.parquet" in r.stdout, r.stdout
    assert "rejects/._00000000.parquet" in r.stdout
    r = run_command("inspect-cache", "--store", out, "--progress", env=ENV, timeout=300)
    assert r.returncode == 0 and "rows done" in r.stdout, r.stderr[-2000:]
    _cache_here(zoo, manifest, out)  # resumes: row 2
    assert _rows(out)[0] == ["r0", "r1", "r2"]
    assert (part / "samples" / "._00000000.parquet").exists() and not partial.exists()


def test_stored_image_paths_are_read_back_only_when_they_hold_the_same_image(zoo, tmp_path):
    """A store written with --image-refs keeps paths and digests: an image changed since, or a path that is not
    a regular file (a store from elsewhere naming /dev/zero), is a reject, not other pixels or an endless read."""
    (tmp_path / "images").mkdir()
    for i in range(2):
        (tmp_path / "images" / f"{i}.png").write_bytes(_png(i))
    manifest = _write_jsonl(tmp_path / "m.jsonl", [json.dumps(_row(f"r{i}", f"images/{i}.png")) for i in range(2)])
    _cache_here(zoo, manifest, tmp_path / "s", image_refs=True)
    store = TeacherStore(tmp_path / "s")
    assert store[0].images == [None] and store[0].image_data() == [_png(0)]
    (tmp_path / "images" / "0.png").write_bytes(_png(5))
    with pytest.raises(RejectError, match="has changed since the store was written"):
        store[0].image_data()
    smp = store[1]
    smp.image_paths = ["/dev/zero"]
    with pytest.raises(RejectError, match="not a regular file"):
        smp.image_data()


# --- remote images -----------------------------------------------------------------------------------------------

class _Server(BaseHTTPRequestHandler):
    png = _png(3)

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # http.server's name
        try:
            if self.path == "/ok.png":
                self._send(200, self.png, {"Content-Length": str(len(self.png))})
            elif self.path == "/big-declared":  # says 400 MB up front: refused before any body is read
                self._send(200, b"", {"Content-Length": str(400 << 20)})
                self.wfile.write(b"\x00" * (1 << 16))
            elif self.path == "/big-streamed":  # no length given: counted as it comes
                self._send(200, b"", {"Connection": "close"})
                for _ in range(64):
                    self.wfile.write(b"\x00" * (1 << 16))
            elif self.path == "/drip":  # a byte every 0.3 s: each read is quick, the whole never ends
                self._send(200, b"", {"Content-Length": "100000"})
                for _ in range(100000):
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    time.sleep(0.3)
            elif self.path == "/to-ftp":
                self._send(302, b"", {"Location": "ftp://127.0.0.1/ok.png", "Content-Length": "0"})
            elif self.path == "/to-ok":
                self._send(302, b"", {"Location": "/ok.png", "Content-Length": "0"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_images_have_a_size_limit_a_total_time_limit_and_http_redirects_only(server, tmp_path):
    opts = {"allow_remote_images": True, "remote_image_timeout": 2.0, "remote_image_max_bytes": 1 << 20}
    assert parse_row(Row(0, _row("x", f"{server}/ok.png")), tmp_path, **opts).images[0].data == _Server.png
    assert parse_row(Row(0, _row("x", f"{server}/to-ok")), tmp_path, **opts).images[0].data == _Server.png
    for path, reason in [("big-declared", "--remote-image-max-bytes 1048576"),
                         ("big-streamed", "--remote-image-max-bytes 1048576"),
                         ("drip", "--remote-image-timeout 2"), ("to-ftp", "only http")]:
        t0 = time.monotonic()
        with pytest.raises(RejectError, match=reason):
            parse_row(Row(0, _row("x", f"{server}/{path}")), tmp_path, **opts)
        assert time.monotonic() - t0 < 10, path
    # The defaults are limits too: 400 MB is refused without the options.
    with pytest.raises(RejectError, match="--remote-image-max-bytes"):
        parse_row(Row(0, _row("x", f"{server}/big-declared")), tmp_path, allow_remote_images=True)


def test_remote_image_limits_through_cache_teacher(zoo, server, tmp_path):
    rows = [_row("ok", f"{server}/ok.png"), _row("big", f"{server}/big-streamed"), _row("drip", f"{server}/drip"),
            _row("ftp", f"{server}/to-ftp")]
    manifest = _write_jsonl(tmp_path / "m.jsonl", [json.dumps(r) for r in rows])
    r = _cache(zoo, manifest, tmp_path / "s", "--allow-remote-images", "--remote-image-timeout", "2",
               "--remote-image-max-bytes", "100000")
    assert r.returncode == 0, r.stderr[-3000:]
    ids, rejects = _rows(tmp_path / "s")
    assert ids == ["ok"], rejects
    assert "--remote-image-max-bytes 100000" in rejects["big"] and "--remote-image-timeout 2" in rejects["drip"]
    assert "ftp://" in rejects["ftp"] and "only http" in rejects["ftp"]


@pytest.mark.parametrize("flag,value", [("--remote-image-timeout", "0"), ("--remote-image-max-bytes", "0")])
def test_remote_image_limits_must_be_positive(flag, value, tmp_path):
    with pytest.raises(ConfigError, match=flag):
        CacheConfig(teacher="t", manifest="m.jsonl", output=tmp_path / "s", device="cpu",
                    **{flag.lstrip("-").replace("-", "_"): float(value)})
    r = run_command("cache-teacher", "--teacher", "t", "--manifest", "m.jsonl", "--output", tmp_path / "s",
                    "--device", "cpu", flag, value, env=ENV, timeout=120)
    assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
