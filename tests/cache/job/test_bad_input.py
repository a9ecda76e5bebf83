"""Bad rows become rejects with their reason (or stop the run with --strict); bad flags fail at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from genrecal_cache.core.errors import ConfigError, DatasetError
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from tests.helpers import run_command


def _ok(i: int, img: str = "images/0000.png") -> dict:
    return {"id": f"ok-{i}", "images": [img], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
        {"role": "assistant", "content": "seven"}]}


BAD_ROWS = {
    "missing image": ({"id": "b0", "images": ["images/nope.png"], "messages": _ok(0)["messages"]},
                      "image 0 is not a file under the image root"),
    "undecodable image": ({"id": "b1", "images": ["images/garbage.png"], "messages": _ok(0)["messages"]},
                          "cannot decode image 0"),
    "empty answer": ({"id": "b2", "messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "  "}]},
                     "assistant turn 1 is empty"),
    "missing answer": ({"id": "b3", "messages": [{"role": "user", "content": "hi"}]},
                       "conversation has no assistant turn"),
    "too long": ({"id": "b4", "messages": [{"role": "user", "content": "one two " * 200},
                                           {"role": "assistant", "content": "ok"}]},
                 "more than --max-length 150"),
    "malformed json": ('{"id": "b5", "messages": [', "malformed JSON on m.jsonl line"),
    "unknown role": ({"id": "b6", "messages": [{"role": "wizard", "content": "x"},
                                               {"role": "assistant", "content": "y"}]}, "unknown role 'wizard'"),
    "image count": ({"id": "b7", "images": ["images/0000.png", "images/0000.png"],
                     "messages": _ok(0)["messages"]}, "1 image placeholder(s) in 'messages' but 2 image(s)"),
    "llava image count": ({"id": "b8", "conversations": [{"from": "human", "value": "<image> <image> hi"},
                                                         {"from": "gpt", "value": "x"}], "image": "images/0000.png"},
                          "2 image placeholder(s) in 'conversations' but 1 image(s)"),
    "duplicate id": (_ok(0), "duplicate sample id 'ok-0'"),
    "not an object": ("[1, 2]", "is a JSON list, not an object"),
}


@pytest.fixture()
def bad_manifest(tmp_path: Path, demo_manifest: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0000.png").write_bytes((demo_manifest.parent / "images" / "0000.png").read_bytes())
    (tmp_path / "images" / "garbage.png").write_bytes(b"\x89PNG not really")
    lines = []
    for i, (row, _) in enumerate(BAD_ROWS.values()):
        lines.append(json.dumps(_ok(i)))
        lines.append(row if isinstance(row, str) else json.dumps(row))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(zoo, manifest, out, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(zoo["llava"]), manifest=manifest, output=out, dtype="float32", device="cpu",
                       max_length=150, progress=False, command=["test"], **{"duplicate_ids": "reject", **kw})


def test_every_bad_row_is_rejected_with_its_reason_and_the_run_goes_on(zoo, bad_manifest, tmp_path):
    res = run_cache(_cfg(zoo, bad_manifest, tmp_path / "s", commit_every=3))
    store = TeacherStore(tmp_path / "s")
    rejects = {r["source_row"]: r["reason"] for r in store.rejects().to_pylist()}
    for i, (name, (_, reason)) in enumerate(BAD_ROWS.items()):
        assert 2 * i + 1 in rejects, f"{name}: row not rejected"
        assert reason in rejects[2 * i + 1], f"{name}: got {rejects[2 * i + 1]!r}"
    committed = store.parts[0].samples.column("source_row").to_pylist()
    assert sorted(committed + list(rejects)) == list(range(2 * len(BAD_ROWS)))
    assert res.samples == len(BAD_ROWS) and res.rejects == len(BAD_ROWS)


def test_strict_stops_at_the_first_bad_row(zoo, bad_manifest, tmp_path):
    with pytest.raises(DatasetError, match=r"row 1 \(b0\): image 0 is not a file.*drop --strict"):
        run_cache(_cfg(zoo, bad_manifest, tmp_path / "s", strict=True))


def test_missing_manifest_fails_at_once(zoo, tmp_path):
    with pytest.raises(DatasetError, match="--manifest .*no such file or folder"):
        run_cache(_cfg(zoo, tmp_path / "nope.jsonl", tmp_path / "s"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_fails_at_once(zoo, bad_manifest, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        run_cache(_cfg(zoo, bad_manifest, locked / "s"))


def test_output_that_is_a_file_or_foreign_directory_fails(zoo, bad_manifest, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run_cache(_cfg(zoo, bad_manifest, f))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match="not a teacher store"):
        run_cache(_cfg(zoo, bad_manifest, d))


def test_missing_teacher_path_fails_at_once(bad_manifest, tmp_path):
    with pytest.raises(ConfigError, match="--teacher ./no/such/model: no model there"):
        run_cache(CacheConfig(teacher="./no/such/model", manifest=bad_manifest, output=tmp_path / "s",
                              progress=False))


@pytest.mark.parametrize("flags,message", [
    (["--shard", "2/2"], "--shard 2/2: need 0 <= i < n"),
    (["--shard", "x"], "--shard must look like i/n"),
    (["--topk", "-1"], "--topk must be >= 0"),
    (["--dtype", "int8"], "--dtype must be one of"),
])
def test_cli_flag_errors_name_the_flag(bad_manifest, tmp_path, flags, message):
    r = run_command("cache-teacher", "--teacher", "x", "--manifest", bad_manifest, "--output", tmp_path / "s", *flags,
                    timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_incompatible_settings_or_teacher_on_existing_store(zoo, bad_manifest, tmp_path):
    from genrecal_cache.core.errors import IncompatibleStoreError

    out = tmp_path / "s"
    run_cache(_cfg(zoo, bad_manifest, out, max_samples=2))
    with pytest.raises(IncompatibleStoreError, match="topk=20, this run asks for 5"):
        run_cache(_cfg(zoo, bad_manifest, out, max_samples=2, topk=5))
    with pytest.raises(IncompatibleStoreError, match="another teacher"):
        run_cache(CacheConfig(teacher=str(zoo["qwen2vl"]), manifest=bad_manifest, output=out, dtype="float32",
                              device="cpu", max_length=150, max_samples=2, duplicate_ids="reject", progress=False,
                              command=["t"]))


def test_extending_max_samples_continues_the_store(zoo, bad_manifest, tmp_path):
    out = tmp_path / "s"
    run_cache(_cfg(zoo, bad_manifest, out, max_samples=4))
    res = run_cache(_cfg(zoo, bad_manifest, out, max_samples=10))
    store = TeacherStore(out)
    assert res.skipped == 4 and len(store) + store.rejects().num_rows == 10


def test_a_second_writer_on_the_same_part_is_refused(zoo, bad_manifest, tmp_path):
    from genrecal_cache.core.errors import StoreError
    from genrecal_cache.job.cache_job import CacheJob

    out = tmp_path / "s"
    first = CacheJob(_cfg(zoo, bad_manifest, out))
    with pytest.raises(StoreError, match="another cache-teacher is writing part shard-00000-of-00001"):
        CacheJob(_cfg(zoo, bad_manifest, out), teacher=first.teacher)


def test_duplicate_ids_are_rejected_whichever_shard_owns_them(zoo, bad_manifest, tmp_path):
    lines = bad_manifest.read_text().splitlines()
    twin = json.loads(lines[0])  # row 0's id again at row 3 (owned by shard 1 of 2)
    lines.insert(3, json.dumps(twin))
    m = tmp_path / "dup.jsonl"
    m.write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "0000.png").write_bytes((bad_manifest.parent / "images" / "0000.png").read_bytes())
    out = tmp_path / "s"
    for shard in ("0/2", "1/2"):
        run_cache(_cfg(zoo, m, out, shard=shard))
    store = TeacherStore(out)
    ids = [sid for p in store.parts for sid in p.samples.column("sample_id").to_pylist()]
    assert len(ids) == len(set(ids))
    reasons = {r["source_row"]: r["reason"] for r in store.rejects().to_pylist()}
    assert reasons[3] == "duplicate sample id 'ok-0' (first at row 0)"


def test_a_sample_the_teacher_cannot_run_is_rejected_and_the_batch_goes_on(zoo, bad_manifest, tmp_path):
    """Fault injection into our own forward: a sample that makes the teacher raise (as an OOM would) is found
    by retrying one at a time and rejected; the rest of its batch is committed."""
    from genrecal_cache.teacher.hf import HFTeacher

    class FailsOnEight(HFTeacher):
        def forward(self, renderer, batch, question, images=None, layers=()):
            if any("eight" in renderer.tokenizer.decode(r.input_ids) for r in batch):
                raise RuntimeError("CUDA out of memory (injected)")
            return super().forward(renderer, batch, question, images, layers)

    rows = [_ok(i) for i in range(4)]
    rows[2]["messages"][1]["content"] = "eight"
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "0000.png").write_bytes((bad_manifest.parent / "images" / "0000.png").read_bytes())
    cfg = _cfg(zoo, m, tmp_path / "s", batch_tokens=100000)
    res = run_cache(cfg, FailsOnEight(str(zoo["llava"]), "float32", "cpu"))
    store = TeacherStore(tmp_path / "s")
    assert res.samples == 3 and len(store) == 3
    (rej,) = store.rejects().to_pylist()
    assert rej["source_row"] == 2 and "teacher forward failed" in rej["reason"] and "out of memory" in rej["reason"]


def test_an_interrupted_store_creation_is_finished_by_the_rerun(zoo, bad_manifest, tmp_path):
    import zarr

    out = tmp_path / "s"
    zarr.open_group(str(out), mode="w", zarr_format=3).require_group("head")  # killed before its attributes
    run_cache(_cfg(zoo, bad_manifest, out, max_samples=2))
    assert len(TeacherStore(out)) + TeacherStore(out).rejects().num_rows == 2
