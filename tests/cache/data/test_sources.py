"""Datasets as users have them: small files shaped exactly like the public ones (LLaVA-Instruct / mix665k and
ShareGPT4V JSON arrays with an image folder, a llava-instruct-mix-vsft Parquet with an `images` column of structs,
LLaMA-Factory's mllm_demo, an lmms-lab flat VQA table, OpenAI image_url parts, a 3-shard Parquet dataset, a
save_to_disk folder, a Hub dataset in the local cache), each cached into the store the equivalent JSONL gives."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genrecal_cache.core.digests import file_digest
from genrecal_cache.core.errors import DatasetError, IncompatibleStoreError, RejectError
from genrecal_cache.data.rows import Columns, Row, parse_row
from genrecal_cache.data.sources import changed_file, open_source
from genrecal_cache.job.config import CacheConfig, DuplicateIds
from genrecal_cache.job.launch import run_cache
from genrecal_cache.job.preflight import plan_ids
from genrecal_cache.store.reader import TeacherStore
from tests.helpers import ROOT, run_command

# (id, image under the image root or None, question, answer): the id a1 repeats, as image stems do in LLaVA mixes
ROWS = [("a1", "coco/train2017/0000.png", "What digit is this?", "seven"),
        ("a2", "coco/train2017/0001.png", "Which digit?", "three"),
        ("a1", "coco/train2017/0002.png", "And this one?", "five"),
        ("t1", None, "Say nine.", "nine")]


@pytest.fixture(scope="module")
def data(demo_manifest, tmp_path_factory) -> Path:
    """An image root holding coco/train2017/*.png, as LLaVA's instructions lay it out."""
    root = tmp_path_factory.mktemp("data")
    (root / "coco" / "train2017").mkdir(parents=True)
    for i in range(3):
        shutil.copy(demo_manifest.parent / "images" / f"{i:04d}.png", root / "coco" / "train2017" / f"{i:04d}.png")
    return root


def _canonical(data: Path) -> Path:
    """The same rows in the transformers messages format, one JSON object per line."""
    lines = []
    for sid, img, q, a in ROWS:
        user = ([{"type": "image"}] if img else []) + [{"type": "text", "text": q}]
        lines.append({"id": sid, "images": [img] if img else [],
                      "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": a}]})
    p = data / "canonical.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def _llava_json(data: Path) -> Path:
    """LLaVA-Instruct-150K / mix665k / ShareGPT4V: one indented JSON array; `image` relative to an image folder."""
    rows = []
    for sid, img, q, a in ROWS:
        row = {"id": sid, "conversations": [{"from": "human", "value": f"<image>\n{q}" if img else q},
                                            {"from": "gpt", "value": a}]}
        if img:
            row["image"] = img
        rows.append(row)
    p = data / "json" / "llava_v1_5_mix665k.json"
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps(rows, indent=2))
    return p


def _mllm_demo(data: Path) -> Path:
    """LLaMA-Factory's mllm_demo.json: `<image>` inside string content, an `images` list, no ids."""
    rows = [{"messages": [{"content": f"<image>{q}" if img else q, "role": "user"},
                          {"content": a, "role": "assistant"}], "images": [img] if img else []}
            for _, img, q, a in ROWS]
    p = data / "mllm_demo.json"
    p.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    return p


def _image_struct(data: Path, img: str | None) -> list[dict]:
    return [{"bytes": (data / img).read_bytes(), "path": Path(img).name}] if img else []


def _vsft_parquet(data: Path) -> Path:
    """HuggingFaceH4/llava-instruct-mix-vsft: `messages` with indexed parts, `images` a list of Image structs."""
    from datasets import Dataset, Image, Sequence

    rows = {"id": [], "messages": [], "images": []}
    for sid, img, q, a in ROWS:
        user = ([{"index": 0, "text": None, "type": "image"}] if img else []) + [
            {"index": None, "text": q, "type": "text"}]
        rows["id"].append(sid)
        rows["messages"].append([{"role": "user", "content": user},
                                 {"role": "assistant", "content": [{"index": None, "text": a, "type": "text"}]}])
        rows["images"].append(_image_struct(data, img))
    ds = Dataset.from_dict(rows).cast_column("images", Sequence(Image()))
    p = data / "vsft" / "train-00000-of-00001.parquet"
    p.parent.mkdir(exist_ok=True)
    ds.to_parquet(str(p))
    return p


def _flat_vqa(data: Path) -> Path:
    """An lmms-lab-style evaluation table: question_id, question, answers (a list), image (an Image struct)."""
    from datasets import Dataset, Image

    ds = Dataset.from_dict({"question_id": [r[0] for r in ROWS], "question": [r[2] for r in ROWS],
                            "answers": [[r[3], "other"] for r in ROWS],
                            "image": [(_image_struct(data, r[1]) or [None])[0] for r in ROWS]})
    ds = ds.cast_column("image", Image())
    p = data / "vqa.parquet"
    ds.to_parquet(str(p))
    return p


def _openai(data: Path) -> Path:
    """OpenAI chat parts: image_url with a data URI, a file:// path and a plain path."""
    lines = []
    for k, (sid, img, q, a) in enumerate(ROWS):
        user = [{"type": "text", "text": q}]
        if img:
            url = [f"data:image/png;base64,{base64.b64encode((data / img).read_bytes()).decode()}",
                   f"file://{data / img}", img][k % 3]
            user.insert(0, {"type": "image_url", "image_url": {"url": url}})
        lines.append({"id": sid, "messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": a}]})
    p = data / "openai.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def _sharded(data: Path) -> Path:
    """A Hub-style dataset folder: data/train-0000k-of-00003.parquet (and a test split beside it)."""
    from datasets import Dataset, Image, Sequence

    folder = data / "sharded"
    if folder.exists():
        return folder
    (folder / "data").mkdir(parents=True)
    for k, (sid, img, q, a) in enumerate(ROWS):
        user = ([{"type": "image", "text": None}] if img else []) + [{"type": "text", "text": q}]
        ds = Dataset.from_dict({"id": [sid], "images": [_image_struct(data, img)],
                                "messages": [[{"role": "user", "content": user},
                                              {"role": "assistant", "content": [{"type": "text", "text": a}]}]]})
        ds = ds.cast_column("images", Sequence(Image()))
        if k < 3:
            ds.to_parquet(str(folder / "data" / f"train-{k:05d}-of-00003.parquet"))
        else:  # the text-only row: the whole of the test split
            ds.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


def _cache(zoo, manifest, out, **kw) -> TeacherStore:
    run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=manifest, output=out, dtype="float32", device="cpu",
                          progress=False, command=["t"], **kw))
    return TeacherStore(out)


def _by_row(store: TeacherStore) -> dict[int, object]:
    return {s.source_row: s for p in store.parts for s in p.read(0, len(p))}


def _assert_same(store: TeacherStore, reference: TeacherStore, rows: list[int] | None = None) -> None:
    got, ref = _by_row(store), _by_row(reference)
    rows = sorted(ref) if rows is None else rows
    assert sorted(got) == list(range(len(rows))), f"committed rows {sorted(got)}"
    for i, r in enumerate(rows):
        assert torch.equal(got[i].token_ids, ref[r].token_ids), f"row {i}: other tokens"
        assert torch.equal(got[i].features, ref[r].features), f"row {i}: other features"


@pytest.fixture(scope="module")
def reference(zoo, data, tmp_path_factory) -> TeacherStore:
    return _cache(zoo, _canonical(data), tmp_path_factory.mktemp("ref") / "store")


@pytest.mark.parametrize("make,kw", [
    (_llava_json, {"image_root": "DATA"}),
    (_mllm_demo, {}),
    (_vsft_parquet, {}),
    (_flat_vqa, {"columns": "id=question_id,answer=answers"}),
    (_openai, {}),
])
def test_public_formats_give_the_store_of_the_equivalent_jsonl(zoo, data, reference, tmp_path, make, kw):
    kw = {k: (data if v == "DATA" else v) for k, v in kw.items()}
    store = _cache(zoo, make(data), tmp_path / "s", **kw)
    assert store.rejects().num_rows == 0, store.rejects().to_pylist()
    _assert_same(store, reference)
    ids = [s.sample_id for s in _by_row(store).values()]
    if make is not _mllm_demo:  # no ids there: row-N
        assert ids == ["a1", "a2", "a1#2", "t1"], ids


def test_a_sharded_folder_becomes_one_store_split_by_split(zoo, data, reference, tmp_path):
    folder = _sharded(data)
    with pytest.raises(DatasetError, match="holds the splits test, train: pass --split"):
        open_source(folder)
    _assert_same(_cache(zoo, folder, tmp_path / "train", split="train"), reference, [0, 1, 2])
    _assert_same(_cache(zoo, folder, tmp_path / "test", split="test"), reference, [3])
    glob = _cache(zoo, str(folder / "data" / "train-*.parquet"), tmp_path / "glob")
    _assert_same(glob, reference, [0, 1, 2])


def test_save_to_disk_and_a_hub_dataset_in_the_local_cache(zoo, data, reference, tmp_path, monkeypatch):
    from datasets import DatasetDict, load_dataset

    folder = _sharded(data)
    dd = DatasetDict({"train": load_dataset("parquet", data_files=str(folder / "data" / "train-*.parquet"),
                                            split="train", cache_dir=str(tmp_path / "hf")),
                      "test": load_dataset("parquet", data_files=str(folder / "data" / "test-*.parquet"),
                                           split="train", cache_dir=str(tmp_path / "hf"))})
    dd.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DatasetError, match="holds the splits train, test: pass --split"):
        open_source(tmp_path / "saved")
    _assert_same(_cache(zoo, tmp_path / "saved", tmp_path / "s1", split="train"), reference, [0, 1, 2])
    # The Hub cache layout huggingface_hub writes: datasets--ORG--NAME/{refs/main, snapshots/<commit>/...}
    hub = tmp_path / "hub"
    snap = hub / "datasets--acme--digits-vqa" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snap)
    (hub / "datasets--acme--digits-vqa" / "refs").mkdir()
    (hub / "datasets--acme--digits-vqa" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    _assert_same(_cache(zoo, "hub:acme/digits-vqa", tmp_path / "s2"), reference, [0, 1, 2])  # split: train
    with pytest.raises(DatasetError, match="not in the local Hugging Face cache"):
        open_source("hub:acme/elsewhere")


def test_duplicate_ids_suffix_is_stable_and_reject_still_works():
    ids = ["a", "b", "a", None, "a#2", "a"]
    n, renamed, rejected = plan_ids(ids, DuplicateIds.suffix)
    assert n == 6 and rejected == {} and renamed == {2: "a#2#", 5: "a#3"}, renamed  # a#2 exists in the data
    assert plan_ids(ids, DuplicateIds.reject)[2] == {2: ("a", 0), 5: ("a", 0)}


def test_a_json_array_is_read_with_bounded_memory(tmp_path):
    """200k rows (~40 MB): reading every row must not hold the file in memory."""
    p = tmp_path / "big.json"
    row = {"id": "x", "conversations": [{"from": "human", "value": "q" * 60}, {"from": "gpt", "value": "a" * 60}]}
    with p.open("w") as f:
        f.write("[\n")
        for i in range(200_000):
            f.write(("," if i else "") + json.dumps({**row, "id": f"r{i}"}, indent=2) + "\n")
        f.write("]\n")
    probe = ("import resource, sys; from genrecal_cache.data.sources import open_source; s = open_source(sys.argv[1]); "
             "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; n = sum(1 for r in s.rows() if r.record); "
             "ids = sum(1 for _ in s.ids()); "
             "print(n, ids, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    out = subprocess.run([sys.executable, "-c", probe, str(p)], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    n, ids, grew_mib = map(int, out.stdout.split())
    size_mib = p.stat().st_size / 2**20
    assert n == ids == 200_000
    assert grew_mib < min(20, size_mib / 4), f"peak RSS grew {grew_mib} MiB reading a {size_mib:.0f} MiB file"


def _row(rec: dict) -> Row:
    return Row(0, rec)


@pytest.mark.parametrize("rec,reason", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
                                                {"type": "text", "text": "q"}]},
                   {"role": "assistant", "content": "a"}]}, "remote URL.*--allow-remote-images"),
    ({"images": ["no/such.png"], "messages": [{"role": "user", "content": "<image>q"},
                                               {"role": "assistant", "content": "a"}]},
     "not a file under the image root.*and not base64"),
    ({"images": ["A" * 100 + "!"], "messages": [{"role": "user", "content": "<image>q"},
                                                 {"role": "assistant", "content": "a"}]},
     "not a file under the image root.*and not base64"),
    ({"images": [base64.b64encode(b"not an image at all" * 8).decode()],
      "messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]},
     "cannot decode image 0"),
    ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]},
     "1 image placeholder\\(s\\) in 'messages' but 0 image"),
    ({"query": "q", "label": "a"}, "neither 'messages'.*--columns question=.*its keys: label, query"),
    ({"question": "q"}, "column 'answer' \\(the answer\\) is missing"),
])
def test_each_bad_form_has_its_reason(tmp_path, rec, reason):
    with pytest.raises(RejectError, match=reason):
        parse_row(_row(rec), tmp_path)


def test_a_column_mapping_reads_a_flat_table(tmp_path):
    s = parse_row(_row({"query": "What?", "label": ["yes", "no"], "qid": 7}), tmp_path,
                  columns=Columns.parse("question=query,answer=label,id=qid"))
    assert s.sample_id == "7" and s.messages[-1]["content"][0]["text"] == "yes"
    with pytest.raises(ValueError, match="--columns: 'quest=x'"):
        Columns.parse("quest=x")


def test_an_all_bad_manifest_exits_non_zero_with_its_reasons(zoo, tmp_path):
    m = tmp_path / "bad.json"
    m.write_text(json.dumps([{"id": f"b{i}", "messages": [{"role": "user", "content": "hi"}]} for i in range(5)]))
    r = run_command("cache-teacher", "--teacher", zoo["llava"], "--manifest", m, "--output", tmp_path / "s",
                    "--no-progress", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no sample committed: 5 of 5 rows rejected" in r.stderr and "5 x conversation has no assistant turn" in \
        r.stderr, r.stderr[-2000:]


def test_max_reject_fraction_stops_keeps_the_work_and_resumes(zoo, data, tmp_path):
    good = {"messages": [{"role": "user", "content": "Say nine."}, {"role": "assistant", "content": "nine"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    rows = [dict(good if i % 4 == 0 or i >= 150 else bad, id=f"r{i}") for i in range(200)]  # 3 of 4 bad, then good
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(x) + "\n" for x in rows))
    args = ["--teacher", str(zoo["llava"]), "--manifest", str(m), "--output", str(tmp_path / "s"), "--no-progress",
            "--commit-every", "16"]
    r = run_command("cache-teacher", *args, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 2 and "stopped: " in r.stderr and "--max-reject-fraction 0.5" in r.stderr, r.stderr[-1500:]
    assert "x conversation has no assistant turn" in r.stderr
    first = TeacherStore(tmp_path / "s")
    done = first.parts[0].commit["rows_end"]
    assert 100 <= done < 200 and len(first) == len(range(0, done, 4))
    r = run_command("cache-teacher", *args, "--max-reject-fraction", "1", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "rejects by reason:" in r.stdout
    store = TeacherStore(tmp_path / "s")
    rows_seen = sorted(store.parts[0].samples.column("source_row").to_pylist()
                       + store.rejects().column("source_row").to_pylist())
    assert rows_seen == list(range(200))  # every row once: committed or rejected


def test_a_resumed_job_on_changed_data_is_refused_naming_the_file(zoo, data, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    canonical = _canonical(data).read_text().splitlines()
    for k in range(2):
        (folder / f"part-{k}.jsonl").write_text("\n".join(canonical[2 * k : 2 * k + 2]) + "\n")
    _cache(zoo, folder, tmp_path / "s", image_root=data, max_samples=3)
    (folder / "part-1.jsonl").write_text(canonical[3] + "\n" + canonical[2] + "\n")
    with pytest.raises(IncompatibleStoreError, match="part-1.jsonl has changed since"):
        _cache(zoo, folder, tmp_path / "s", image_root=data)


def test_each_source_file_is_digested_once_per_version_and_its_ids_read_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "shards"
    folder.mkdir()
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    a.write_text('{"id": "x"}\n{"id": 7}\n')
    b.write_text('{"id": "y"}\n{"no": 1}\n')

    def identity(rehash: bool = False) -> tuple[dict, str]:
        return open_source(folder).identity(rehash), capsys.readouterr().err

    first, err = identity()
    assert "hashing 2 file(s) of the dataset" in err and ", once" in err
    assert [f["sha256"] for f in first["files"]] == [file_digest(a), file_digest(b)]
    again, err = identity()
    assert again == first and err == ""  # a restart reads no file for its digests
    # The ids: read once per content, the same as a fresh read (ints as strings, None where a row has none).
    ids = open_source(folder).kept_ids("id", first)
    assert ids == ["x", "7", "y", None]
    old = b.stat()
    b.write_text('{"id": "z"}\n{"no": 1}\n')  # same size, new bytes ...
    os.utime(b, ns=(old.st_atime_ns, old.st_mtime_ns))  # ... even with the old mtime (its ctime tells)
    assert (b.stat().st_size, b.stat().st_mtime_ns, b.stat().st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)
    now, err = identity()
    assert "hashing 1 file(s) of the dataset" in err and now["files"][1]["sha256"] == file_digest(b)
    assert changed_file(first, now).startswith("b.jsonl has changed since"), changed_file(first, now)
    assert open_source(folder).kept_ids("id", now) == ["x", "7", "z", None]
    b.write_text('{"id": "z"}\n')  # a new size
    now, err = identity()
    assert "hashing 1 file(s)" in err and changed_file(first, now).startswith("b.jsonl has changed since")
    again, err = identity(rehash=True)  # --rehash: every file read again, the same digests
    assert again == now and "hashing 2 file(s) of the dataset (" in err and ", once" not in err


@pytest.mark.vllm
def test_a_llava_json_array_on_the_vllm_engine(zoo, vllm_engine, data, reference, tmp_path):
    """The JSON array and its image folder reach vLLM's engine as the transformers backend's rows (the session's
    shared LLaVA engine, which also captures layers 0 and 1; skipped without vLLM)."""
    teacher = vllm_engine("llava", (0, 1), eager=False)
    run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=_llava_json(data), image_root=data, output=tmp_path / "s",
                          backend="vllm", layers="0,1", dtype="float32", device="cpu", progress=False,
                          command=["t"]), teacher)
    got, ref = _by_row(TeacherStore(tmp_path / "s")), _by_row(reference)
    assert sorted(got) == sorted(ref)
    for i in ref:
        assert torch.equal(got[i].token_ids, ref[i].token_ids)
        assert (got[i].features - ref[i].features).abs().max() <= 1e-4
