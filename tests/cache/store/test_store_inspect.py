"""The store's layout contract (docs/DESIGN.md) and `inspect-cache`: summary, verify, sample view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from genrecal_cache.inspection import sample_view, summary
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.dtypes import from_storage, to_storage
from genrecal_cache.store.format import CHUNK_BYTES
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify
from genrecal_cache.teacher.hf import HFTeacher
from tests.helpers import run_command


def _run(zoo_model: Path, manifest: Path, out: Path, **kw) -> Path:
    kw.setdefault("dtype", "float32")
    run_cache(CacheConfig(teacher=str(zoo_model), manifest=manifest, output=out, device="cpu", progress=False,
                          command=["test"], **kw))
    return out


@pytest.fixture(scope="module")
def bf16_store(zoo, demo_manifest, tmp_path_factory) -> Path:
    return _run(zoo["qwen2vl"], demo_manifest, tmp_path_factory.mktemp("bf16") / "s", dtype="bfloat16",
                question_features=True, commit_every=4)


def test_bf16_round_trips_through_uint16_bits():
    x = torch.randn(37, 96).to(torch.bfloat16)
    stored = to_storage(x, "bfloat16")
    assert stored.dtype == np.uint16
    assert torch.equal(from_storage(stored, "bfloat16"), x)


def test_layout_dtypes_chunks_codecs(bf16_store):
    meta = json.loads((bf16_store / "zarr.json").read_text())["attributes"]["genrecal"]
    assert meta["feature_dtype"] == "bfloat16" and meta["format_version"] == 1
    assert {"command", "versions", "time"} <= meta["provenance"].keys()
    part = bf16_store / "parts" / "shard-00000-of-00001"
    for name in ("token_ids", "label_mask", "features", "targets", "topk_ids", "topk_logprobs", "question_features"):
        arr_meta = json.loads((part / name / "zarr.json").read_text())
        assert arr_meta["zarr_format"] == 3
        (shard,) = [c for c in arr_meta["codecs"] if c["name"] == "sharding_indexed"]
        inner = [c["name"] for c in shard["configuration"]["codecs"]]
        assert "zstd" in inner and "crc32c" in inner, inner
        chunk = shard["configuration"]["chunk_shape"]
        itemsize = np.dtype(arr_meta["data_type"]).itemsize
        assert int(np.prod(chunk)) * itemsize >= CHUNK_BYTES, f"{name}: chunk {chunk} under 1 MiB"
    assert json.loads((part / "features" / "zarr.json").read_text())["data_type"] == "uint16"


def test_bf16_features_are_the_teacher_features_rounded(zoo, bf16_store):
    store = TeacherStore(bf16_store)
    teacher = HFTeacher(str(zoo["qwen2vl"]), "bfloat16", "cpu")
    assert torch.equal(store.head("weight"), teacher.head.weight.to(torch.bfloat16))
    assert store.feature_dtype == torch.bfloat16
    smp = store[0]
    assert smp.features.dtype == torch.bfloat16 and smp.features.shape[1] == 64


def test_head_tied_and_untied(zoo, clean_manifest, tmp_path, bf16_store):
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "one"}]}) + "\n")
    tied = TeacherStore(_run(zoo["textlm"], text, tmp_path / "tied"))
    assert tied.meta["head"]["tied"] and not (tmp_path / "tied" / "head" / "embed").exists()
    assert torch.equal(tied.head("embed"), tied.head("weight"))
    untied = TeacherStore(bf16_store)
    model = HFTeacher(str(zoo["qwen2vl"]), "bfloat16", "cpu")
    assert torch.equal(untied.head("embed"), model.embed)
    assert not torch.equal(untied.head("embed"), untied.head("weight"))


def test_summary_counts(bf16_store, demo_manifest):
    s = summary(TeacherStore(bf16_store))
    n_rows = len(demo_manifest.read_text().splitlines())
    assert s["samples"] + s["rejects"] == n_rows and s["rejects"] == 4
    assert s["label_tokens"] > 0 and s["question_tokens"] + s["label_tokens"] == s["tokens"]
    assert s["compression_ratio"] > 1.0
    assert sum(s["rejects_by_reason"].values()) == 4


def test_verify_passes_on_a_good_store(bf16_store):
    rep = verify(TeacherStore(bf16_store))
    assert rep.ok, rep.failures
    assert rep.topk_compared > 0 and rep.samples_checked == len(TeacherStore(bf16_store))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_names_a_flipped_byte(bf16_store, tmp_path):
    store_dir = _copy(bf16_store, tmp_path / "s")
    shard = store_dir / "parts" / "shard-00000-of-00001" / "features" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    rep = verify(TeacherStore(store_dir))
    assert not rep.ok
    f = rep.failures[0]
    assert f["part"] == "shard-00000-of-00001" and f["array"] == "features" and f["samples"][0] == 0
    with pytest.raises(Exception, match="features"):
        TeacherStore(store_dir).parts[0].read(0, len(TeacherStore(store_dir)))


def test_verify_detects_a_removed_commit_file(bf16_store, tmp_path):
    store_dir = _copy(bf16_store, tmp_path / "s")
    commits = sorted((store_dir / "parts" / "shard-00000-of-00001" / "samples").glob("*.parquet"))
    commits[1].unlink()
    rep = verify(TeacherStore(store_dir))
    assert not rep.ok and any("gap" in f["message"] for f in rep.failures), rep.failures


def test_verify_detects_edited_topk(bf16_store, tmp_path):
    store_dir = _copy(bf16_store, tmp_path / "s")
    arr = zarr.open_array(str(store_dir / "parts" / "shard-00000-of-00001" / "topk_logprobs"), mode="r+")
    arr[2] = arr[2] - 1.0  # a consistent, checksummed write of wrong values
    rep = verify(TeacherStore(store_dir))
    assert any(f["array"] == "topk" for f in rep.failures)


def test_sample_view_decodes_tokens_targets_and_topk(bf16_store):
    store = TeacherStore(bf16_store)
    sid = store.parts[0].samples.column("sample_id")[0].as_py()
    v = sample_view(store, sid, k=2)
    labelled = [r for r in v["tokens"] if "target" in r]
    assert len(labelled) == v["num_labels"] and all(len(r["topk"]) == 2 for r in labelled)
    assert any(r["target"] == "<|im_end|>" for r in labelled)
    folded = [r for r in v["tokens"] if "repeat" in r]
    assert folded and all(r["token"] == "<|image_pad|>" for r in folded)
    assert sum(r.get("repeat", 1) for r in v["tokens"]) == v["num_tokens"]


def test_inspect_cli_json_and_exit_codes(bf16_store, tmp_path):
    r = run_command("inspect-cache", "--store", bf16_store, "--verify", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verify"]["ok"] and out["summary"]["samples"] > 0
    r = run_command("inspect-cache", "--store", tmp_path / "nothing", timeout=120)
    assert r.returncode == 2 and "no teacher store" in r.stderr


def test_image_refs_keep_paths_and_digests_not_bytes(zoo, demo_manifest, tmp_path):
    store = TeacherStore(_run(zoo["llava"], demo_manifest, tmp_path / "s", image_refs=True))
    samples = [store[i] for i in range(len(store))]
    for s in samples:
        assert len(s.images) == len(s.image_paths)
        for data, path in zip(s.images, s.image_paths):
            assert (data is None) == bool(path), "by reference where there is a path, else the bytes"
    assert any(s.images and s.images[0] is not None for s in samples), "inline base64 images keep their bytes"
    rows = store.parts[0].samples.to_pylist()
    by_path = [r for r in rows if r["image_paths"] and r["image_paths"][0]]
    import hashlib

    r = by_path[0]
    assert hashlib.sha256(Path(r["image_paths"][0]).read_bytes()).hexdigest() == r["image_digests"][0]


def test_verify_detects_a_deleted_shard_file(bf16_store, tmp_path):
    store_dir = _copy(bf16_store, tmp_path / "s")
    (store_dir / "parts" / "shard-00000-of-00001" / "question_features" / "c" / "0" / "0").unlink()
    rep = verify(TeacherStore(store_dir))
    assert any(f["array"] == "question_features" and "missing" in f["message"] for f in rep.failures), rep.failures


def test_verify_detects_a_removed_rejects_file(bf16_store, tmp_path):
    store_dir = _copy(bf16_store, tmp_path / "s")
    rejects = sorted((store_dir / "parts" / "shard-00000-of-00001" / "rejects").glob("*.parquet"))
    with_rows = [f for f in rejects if __import__("pyarrow.parquet").parquet.read_table(f).num_rows]
    with_rows[0].unlink()
    rep = verify(TeacherStore(store_dir))
    assert any("neither committed nor rejected" in f["message"] for f in rep.failures), rep.failures
