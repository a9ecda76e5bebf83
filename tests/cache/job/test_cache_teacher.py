"""End to end: `cache-teacher` with the transformers backend over the zoo, checked against the models themselves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genrecal_cache.core.models import load_processor
from genrecal_cache.data.rows import Row, parse_row
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.teacher.hf import HFTeacher
from tests.helpers import run_command, start_command


def _cfg(zoo_model: Path, manifest: Path, out: Path, **kw) -> CacheConfig:
    kw.setdefault("progress", False)
    return CacheConfig(teacher=str(zoo_model), manifest=manifest, output=out, dtype="float32", device="cpu",
                       command=["test"], **kw)


@pytest.fixture(scope="module")
def stores(zoo, clean_manifest, text_manifest, tmp_path_factory) -> dict[str, Path]:
    """One float32 store per zoo model over the clean demo rows (question features on, small batches)."""
    out = {}
    for name, path in zoo.items():
        manifest = clean_manifest if name != "textlm" else text_manifest
        store = tmp_path_factory.mktemp(name) / "store"
        run_cache(_cfg(path, manifest, store, question_features=True, batch_tokens=300, commit_every=5))
        out[name] = store
    return out


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2vl", "textlm"])
def test_features_times_head_reproduce_teacher_logits(name, zoo, stores):
    """head(features) equals the teacher's own logits at every label position (unbatched full forward)."""
    store = TeacherStore(stores[name])
    head = store.teacher_head()
    teacher = HFTeacher(str(zoo[name]), "float32", "cpu")
    renderer = teacher.renderer(None)
    assert len(store) >= 3
    checked = 0
    for i in range(len(store)):
        smp = store[i]
        sample = parse_row(Row(smp.source_row, {"messages": smp.messages, "images": smp.images}), Path("."))
        r = renderer.render(sample)
        assert np.array_equal(r.input_ids, smp.token_ids.numpy()), "stored ids differ from the processor's"
        with torch.no_grad():
            logits = teacher.model(**r.inputs).logits[0]  # (L, V)
        expect = logits[smp.label_positions]
        got = head.logits(smp.features)
        err = (got - expect).abs().max().item()
        assert err <= 1e-4, f"{name} sample {smp.sample_id}: max |head(z) - logits| = {err:.2e}"
        checked += len(smp.targets)
    assert checked > 0


@pytest.mark.parametrize("name", ["llava", "qwen2vl", "textlm"])
def test_question_features_cover_every_other_position(name, zoo, stores):
    store = TeacherStore(stores[name])
    teacher = HFTeacher(str(zoo[name]), "float32", "cpu")
    smp = store[0]
    sample = parse_row(Row(0, {"messages": smp.messages, "images": smp.images}), Path("."))
    r = teacher.renderer(None).render(sample)
    with torch.no_grad():
        h = teacher.model.base_model(**r.inputs).last_hidden_state[0]
    mask = smp.label_mask
    assert torch.allclose(smp.question_features.float(), h[~mask], atol=1e-5)
    assert torch.allclose(smp.features.float(), h[mask], atol=1e-5)


def test_labels_and_targets_single_and_multi_turn_both_formats(zoo, stores):
    """Answer spans decode to the assistant text; label positions sit one before each answer token."""
    store = TeacherStore(stores["qwen2vl"])
    tok = load_processor(zoo["qwen2vl"]).tokenizer
    seen_multi = seen_llava_format = False
    for i in range(len(store)):
        smp = store[i]
        ids = smp.token_ids
        answers = [m for m in smp.messages if m["role"] == "assistant"]
        spans = [(s["answer_start"], s["end"]) for s in smp.segments if s["role"] == "assistant"]
        assert len(spans) == len(answers)
        expected_pos = np.concatenate([np.arange(a - 1, b - 1) for a, b in spans])
        assert np.array_equal(smp.label_positions.numpy(), expected_pos)
        assert torch.equal(smp.targets, ids[smp.label_positions + 1])
        for (a, b), m in zip(spans, answers):
            assert tok.decode(ids[a:b]) == m["content"][0]["text"] + "<|im_end|>\n"
        seen_multi |= len(answers) > 1
        seen_llava_format |= int(smp.sample_id.split("-")[1]) % 4 == 1
    assert seen_multi and seen_llava_format


def test_batched_forward_equals_one_by_one(zoo, clean_manifest, tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    run_cache(_cfg(zoo["idefics3"], clean_manifest, a, batch_tokens=100000))
    run_cache(_cfg(zoo["idefics3"], clean_manifest, b, batch_tokens=1))
    sa, sb = TeacherStore(a), TeacherStore(b)
    assert len(sa) == len(sb) > 0
    for i in range(len(sa)):
        assert torch.allclose(sa[i].features, sb[i].features, atol=1e-5)


def test_rerun_resumes_and_changes_nothing(zoo, clean_manifest, tmp_path):
    out = tmp_path / "s"
    first = run_cache(_cfg(zoo["llava"], clean_manifest, out, commit_every=4))
    again = run_cache(_cfg(zoo["llava"], clean_manifest, out, commit_every=4))
    assert first.samples == 12 and again.samples == 0 and again.skipped == 12
    assert len(TeacherStore(out)) == 12


def test_max_samples_then_more(zoo, clean_manifest, tmp_path):
    out = tmp_path / "s"
    run_cache(_cfg(zoo["llava"], clean_manifest, out, max_samples=5))
    assert len(TeacherStore(out)) == 5


def assert_same_store(a: Path, b: Path) -> None:
    """Same committed samples (ids, offsets, tables) and byte-equal array contents."""
    sa, sb = TeacherStore(a), TeacherStore(b)
    assert [p.name for p in sa.parts] == [p.name for p in sb.parts]
    for pa_, pb_ in zip(sa.parts, sb.parts):
        assert pa_.samples.equals(pb_.samples), "sample tables differ"
        assert sorted(pa_.rejects.to_pylist(), key=str) == sorted(pb_.rejects.to_pylist(), key=str)
        for name in pa_.specs:
            x, y = pa_.array(name)[...], pb_.array(name)[...]
            assert x.shape == y.shape and np.array_equal(x, y), f"array {name} differs"


def test_data_parallel_copies_form_one_store(zoo, demo_manifest, tmp_path):
    """`--data-parallel-size 2`: two copies of the job at once, each writing its own part; every row is committed
    or rejected exactly once, and the counts printed are the sum of both."""
    out = tmp_path / "s"
    p = run_command("cache-teacher", "--teacher", zoo["llava"], "--manifest", demo_manifest, "--output", out,
                    "--data-parallel-size", "2", "--dtype", "float32", "--device", "cpu", "--commit-every", "2",
                    "--no-progress", "--result-json", tmp_path / "r.json",
                    env={"OMP_NUM_THREADS": "1"}, drop_env=("GENRECAL_KILL_AT",), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    store = TeacherStore(out)
    assert [q.name for q in store.parts] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    rows = sorted(r for p in store.parts for r in p.samples.column("source_row").to_pylist())
    rej = sorted(r for p in store.parts for r in p.rejects.column("source_row").to_pylist())
    n_rows = len(demo_manifest.read_text().splitlines())
    counts = json.loads((tmp_path / "r.json").read_text())
    assert (counts["samples"], counts["rejects"]) == (len(rows), len(rej)) and len(rows) > 0
    assert sorted(rows + rej) == list(range(n_rows)), "every row committed or rejected exactly once"


def _copies_of(out: Path) -> list[int]:
    """Pids of the `python -m genrecal_cache cache-teacher` copies writing the store `out`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"genrecal_cache" in cmd and str(out).encode() in cmd and b"--shard" in cmd:
            pids.append(int(proc.name))
    return pids


def test_data_parallel_copies_end_with_their_parent_and_keep_its_exit_status(zoo, demo_manifest, tmp_path):
    """A SIGKILLed `--data-parallel-size` job takes its copies with it (none keeps its part locked), the re-run
    completes the store; a teacher failure in a copy ends the whole job with exit status 3, as one copy would."""
    out = tmp_path / "s"
    args = ("--teacher", zoo["llava"], "--manifest", demo_manifest, "--output", out, "--data-parallel-size", "2",
            "--dtype", "float32", "--device", "cpu", "--commit-every", "2", "--no-progress")
    drop = ("GENRECAL_KILL_AT", "GENRECAL_CUDA_ERROR_AT")
    p = start_command("cache-teacher", *args, env={"OMP_NUM_THREADS": "1"}, drop_env=drop, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_copies_of(out)) < 2 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert len(_copies_of(out)) == 2, "the two copies never started"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 5
        while _copies_of(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _copies_of(out), "a copy outlived its killed parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    p = run_command("cache-teacher", *args, env={"OMP_NUM_THREADS": "1", "GENRECAL_CUDA_ERROR_AT": "teacher-forward:2"},
                    drop_env=drop, timeout=300)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "failed (their errors are above)" in p.stderr and "Re-run the same command" in p.stderr
    p = run_command("cache-teacher", *args, env={"OMP_NUM_THREADS": "1"}, drop_env=drop, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert TeacherStore(out).completeness()[0] == []
