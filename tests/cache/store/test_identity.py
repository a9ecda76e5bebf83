"""One store, one teacher, one way of writing: the teacher's identity covers every weight file and the processor's
configuration, each part records how it computed the numbers, and a job that would compute them otherwise (another
teacher body, backend or package version) is refused unless --allow-mixed-store, which inspect-cache then shows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from genrecal_cache.core.digests import cached_digest, file_digest
from genrecal_cache.core.errors import IncompatibleStoreError
from genrecal_cache.inspection import summary
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.format import part_runs
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify
from genrecal_cache.teacher.hf import HFTeacher
from tests.helpers import perturbed_copy, run_command

PART = "shard-00000-of-00001"


@pytest.fixture(scope="module")
def teacher_b(zoo, tmp_path_factory) -> Path:
    return perturbed_copy(zoo["llava"], tmp_path_factory.mktemp("b") / "llava-b")


def _cfg(teacher: Path, manifest: Path, out: Path, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(teacher), manifest=manifest, output=out, dtype="float32", device="cpu",
                       progress=False, command=["test"], **kw)


def _attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())


def _edit_meta(store: Path, edit) -> None:
    doc = _attrs(store)
    edit(doc["attributes"]["genrecal"])
    (store / "zarr.json").write_text(json.dumps(doc))


def test_a_teacher_with_one_perturbed_layer_is_refused_unless_mixing_is_allowed(zoo, teacher_b, clean_manifest,
                                                                                tmp_path):
    out, env = tmp_path / "s", {"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    job = ["--manifest", clean_manifest, "--output", out, "--dtype", "float32", "--device", "cpu", "--no-progress"]
    first = run_command("cache-teacher", "--teacher", zoo["llava"], *job, "--max-samples", "2", env=env,
                        drop_env=("GENRECAL_KILL_AT",), timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "hashing 1 file(s) of the dataset" in first.stderr and "hashing 1 weight file(s)" in first.stderr
    refused = run_command("cache-teacher", "--teacher", teacher_b, *job, "--max-samples", "4", env=env,
                          drop_env=("GENRECAL_KILL_AT",), timeout=600)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "teacher.weights_digest" in refused.stderr and "in the store" in refused.stderr
    assert "model.safetensors" in refused.stderr and "--allow-mixed-store" in refused.stderr
    assert "Traceback" not in refused.stderr and len(TeacherStore(out)) == 2  # nothing of teacher B was written
    assert "of the dataset" not in refused.stderr  # digested once, by the first run

    mixed = run_command("cache-teacher", "--teacher", teacher_b, *job, "--max-samples", "4", "--allow-mixed-store",
                        "--rehash", env=env, drop_env=("GENRECAL_KILL_AT",), timeout=600)
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    assert "hashing 1 file(s) of the dataset (" in mixed.stderr and "hashing 1 weight file(s) of the teacher (" \
        in mixed.stderr and ", once" not in mixed.stderr  # --rehash: every file again
    run = part_runs(out)[PART][-1]
    assert run["writer"]["allow_mixed_store"] and [m["key"] for m in run["mixed"]] == ["teacher.weights_digest"]
    shown = run_command("inspect-cache", "--store", out, env=env, timeout=600)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "MIXED STORE" in shown.stdout and "teacher.weights_digest" in shown.stdout
    as_json = run_command("inspect-cache", "--store", out, "--json", env=env, timeout=600)
    (m,) = json.loads(as_json.stdout)["summary"]["mixed"]
    assert m["part"] == PART and m["key"] == "teacher.weights_digest" and m["store"] != m["job"]


def test_identity_covers_every_weight_file_and_the_processor_config(zoo, teacher_b, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = HFTeacher(str(zoo["llava"])).identity()
    b = HFTeacher(str(teacher_b)).identity()
    differ = sorted(k for k in a if a[k] != b[k] and k != "name_or_path")
    assert differ == ["weight_files", "weights_digest"], differ  # the head, config and tokenizer are the same
    assert [f["name"] for f in a["weight_files"]] == ["model.safetensors"]
    assert a["weight_files"][0]["sha256"] == file_digest(zoo["llava"] / "model.safetensors")

    other = tmp_path / "llava-proc"
    shutil.copytree(zoo["llava"], other)
    config = json.loads((other / "processor_config.json").read_text())
    config["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    (other / "processor_config.json").write_text(json.dumps(config))
    c = HFTeacher(str(other)).identity()
    assert sorted(k for k in a if a[k] != c[k] and k != "name_or_path") == ["processor_digest"]
    assert HFTeacher(str(zoo["textlm"])).identity()["processor_digest"] is None  # a bare tokenizer: none


def test_weight_digests_are_computed_once_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    f = model / "model.safetensors"
    f.write_bytes(b"a" * 1000)
    calls = []

    def counted(path: Path) -> str:
        calls.append(path)
        return file_digest(path)

    assert cached_digest(f, counted) == cached_digest(f, counted) == file_digest(f)
    assert len(calls) == 1 and sorted(p.name for p in model.iterdir()) == ["model.safetensors"]  # kept elsewhere
    f.write_bytes(b"b" * 1000)  # another version of the file, same size
    assert cached_digest(f, counted) == file_digest(f) and len(calls) == 2
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))  # a cache that cannot be written
    assert cached_digest(f, counted) == file_digest(f) and len(calls) == 3


@pytest.mark.parametrize("key,value,named", [
    ("backend", "vllm", "backend: 'vllm' in the store, 'hf' in this job"),
    ("transformers", "4.0.0", "versions.transformers: '4.0.0' in the store"),
])
def test_another_backend_or_version_is_refused_unless_mixing_is_allowed(zoo, clean_manifest, tmp_path, key, value,
                                                                        named):
    out = tmp_path / "s"
    run_cache(_cfg(zoo["llava"], clean_manifest, out, max_samples=2))

    def written_otherwise(meta: dict) -> None:  # as a vLLM job, or another transformers, would have created it
        target = meta["writer"] if key == "backend" else meta["writer"]["versions"]
        target[key] = value

    _edit_meta(out, written_otherwise)
    with pytest.raises(IncompatibleStoreError, match=named):
        run_cache(_cfg(zoo["llava"], clean_manifest, out, max_samples=4))
    res = run_cache(_cfg(zoo["llava"], clean_manifest, out, max_samples=4, allow_mixed_store=True))
    assert res.samples == 2
    run = part_runs(out)[PART][-1]
    assert [m["key"] for m in run["mixed"]] == [key if key == "backend" else f"versions.{key}"]
    assert summary(TeacherStore(out))["mixed"][0]["store"] == value


def test_stores_written_before_the_identity_checks_are_read_and_resumed(zoo, teacher_b, clean_manifest, tmp_path,
                                                                        capfd):
    out = tmp_path / "s"
    run_cache(_cfg(zoo["llava"], clean_manifest, out, max_samples=2))

    def older(meta: dict) -> None:  # what GenRecal wrote before: no writer record, no weight or processor digest
        del meta["writer"]
        for k in ("weights_digest", "weight_files", "processor_digest"):
            del meta["teacher"][k]

    _edit_meta(out, older)
    part = out / "parts" / PART / "zarr.json"
    doc = json.loads(part.read_text())
    doc["attributes"]["provenance"] = [{k: v for k, v in r.items() if k not in ("writer", "mixed")}
                                       for r in doc["attributes"]["provenance"]]
    part.write_text(json.dumps(doc))
    store = TeacherStore(out)
    assert len(store) == 2 and verify(store).ok and not summary(store)["mixed"]

    capfd.readouterr()
    run_cache(_cfg(zoo["llava"], clean_manifest, out, max_samples=4))  # an older store: resumed, and told so
    assert "records no teacher.weights_digest" in capfd.readouterr().err
    assert "writer" in part_runs(out)[PART][-1]
    # From then on the part's recorded run is what later jobs are compared with.
    with pytest.raises(IncompatibleStoreError, match="teacher.weights_digest"):
        run_cache(_cfg(teacher_b, clean_manifest, out, max_samples=6))
    assert torch.equal(TeacherStore(out)[0].token_ids, store[0].token_ids)
