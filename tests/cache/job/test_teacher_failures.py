"""A teacher that fails is not a bad row: an engine or device failure stops the job after committing what is done
(exit status 3) and the same command resumes; a row the teacher cannot take is still a reject, retryable with
`--retry-rejects`; NaN/inf teacher values never enter a store. The teachers here are real tiny transformers models
wrapped in a Teacher subclass that fails as a device would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genrecal_cache.core.errors import TeacherFailure
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.format import REJECT_KINDS
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import verify
from genrecal_cache.teacher.hf import HFTeacher
from tests.cache.job.test_cache_teacher import assert_same_store
from tests.helpers import run_command

N_ROWS = 12
ENV, DROP = {"OMP_NUM_THREADS": "1"}, ("GENRECAL_KILL_AT", "GENRECAL_ENOSPC_AT", "GENRECAL_CUDA_ERROR_AT")


class EngineDeadError(Exception):
    """What vLLM raises when its engine core dies (the job knows it by name: it never imports vLLM for it)."""


class Failing(HFTeacher):
    """A real tiny teacher whose device fails: every forward from call `after` on raises `error`; and, if given,
    every forward of a batch holding a sample whose text has `poison` raises `poison_error` (the row's fault)."""

    def __init__(self, path, after=None, error=None, poison=None, poison_error=None, nan_in=None):
        super().__init__(str(path), "float32", "cpu")
        self.after, self.error, self.calls = after, error, 0
        self.poison, self.poison_error, self.nan_in = poison, poison_error, nan_in

    def forward(self, renderer, batch, question, images=None, layers=()):
        self.calls += 1
        if self.after is not None and self.calls > self.after:
            raise self.error
        texts = [renderer.tokenizer.decode(r.input_ids) for r in batch]
        if self.poison and any(self.poison in t for t in texts):
            raise self.poison_error
        outs = super().forward(renderer, batch, question, images, layers)
        for t, out in zip(texts, outs):
            if self.nan_in and self.nan_in in t:
                out.features[0, :5] = float("nan")  # as a teacher whose numbers blew up would give
        return outs


def _write_manifest(folder: Path, demo_manifest: Path, marks: dict[int, str] | None = None) -> Path:
    """N_ROWS image rows; row i's question ends with marks[i] (a word the failing teacher looks for)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    shutil.copy(demo_manifest.parent / "images" / "0000.png", folder / "images" / "0000.png")
    rows = [{"id": f"r{i}", "images": ["images/0000.png"], "messages": [
        {"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": f"What digit? {(marks or {}).get(i, '')}"}]},
        {"role": "assistant", "content": ["zero", "one", "two", "three"][i % 4]}]} for i in range(N_ROWS)]
    path = folder / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(zoo, manifest, out, batch_tokens, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(zoo["llava"]), manifest=manifest, output=out, dtype="float32", device="cpu",
                       commit_every=4, batch_tokens=batch_tokens, progress=False, command=["test"], **kw)


@pytest.fixture(scope="module")
def manifest(demo_manifest, tmp_path_factory) -> Path:
    return _write_manifest(tmp_path_factory.mktemp("m"), demo_manifest, {5: "poison", 9: "poison"})


@pytest.fixture(scope="module")
def references(zoo, manifest, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted stores with a healthy teacher: one sample per batch (1), and four per batch (100000)."""
    out = {}
    for bt in (1, 100000):
        out[bt] = tmp_path_factory.mktemp("ref") / "s"
        run_cache(_cfg(zoo, manifest, out[bt], bt))
    return out


FAILURES = {
    "engine death": EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause."),
    "CUDA error": RuntimeError("CUDA error: an illegal memory access was encountered"),
    "unknown error for every sample": ConnectionResetError("connection to the engine lost"),
}


@pytest.mark.parametrize("failure,batch_tokens,after", [
    ("engine death", 1, 6), ("CUDA error", 100000, 1),  # known by name or message: stops at once
    ("unknown error for every sample", 1, 6),  # the sample alone fails, and so does the one that ran before it
    ("unknown error for every sample", 100000, 1),  # the batch, then each sample alone, then the one before
    ("unknown error for every sample", 100000, 0),  # nothing ran yet: no sample of the batch runs alone
])
def test_a_failing_teacher_stops_the_job_and_the_same_command_resumes(zoo, manifest, references, tmp_path,
                                                                      failure, batch_tokens, after):
    """The issue's case: an engine that fails after one forward rejected every later sample for good. Now the job
    stops with the good rows committed and no reject for the rows the teacher was running; the same job with a
    healthy teacher then commits them, giving the store an uninterrupted run gives."""
    out = tmp_path / "s"
    with pytest.raises(TeacherFailure, match="the teacher failed, not the data.*Re-run the same command"):
        run_cache(_cfg(zoo, manifest, out, batch_tokens), Failing(zoo["llava"], after, FAILURES[failure]))
    store = TeacherStore(out)
    done = after if batch_tokens == 1 else 4 * after  # one flush (4 rows) per call with big batches
    assert len(store) == done and store.rejects().num_rows == 0
    assert store.parts[0].commit["rows_end"] == done if done else not store.parts[0].commits
    # whole as far as it goes: --verify names only the part's unfinished state
    assert all("unfinished" in f["message"] or "no commit yet" in f["message"] for f in verify(store).failures)
    res = run_cache(_cfg(zoo, manifest, out, batch_tokens), HFTeacher(str(zoo["llava"]), "float32", "cpu"))
    assert (res.skipped, res.samples) == (done, N_ROWS - done)
    assert_same_store(references[batch_tokens], out)


def test_a_device_error_exits_3_through_the_cli_and_the_rerun_completes(zoo, manifest, references, tmp_path):
    """A CUDA error on the third teacher call (injected where the job calls the teacher): exit status 3 (not 2, so
    Ray re-runs the part), the message says to re-run; the plain re-run ends equal to an uninterrupted run."""
    out = tmp_path / "s"
    args = ("--teacher", zoo["llava"], "--manifest", manifest, "--output", out, "--dtype", "float32", "--device",
            "cpu", "--commit-every", 4, "--batch-tokens", 1, "--no-progress")
    p = run_command("cache-teacher", *args, env={**ENV, "GENRECAL_CUDA_ERROR_AT": "teacher-forward:6"},
                    drop_env=DROP, timeout=600)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "the teacher failed, not the data" in p.stderr and "CUDA error" in p.stderr
    assert "Re-run the same command" in p.stderr and "Traceback" not in p.stderr
    assert len(TeacherStore(out)) == 6 and TeacherStore(out).rejects().num_rows == 0
    p = run_command("cache-teacher", *args, env=ENV, drop_env=DROP, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_store(references[1], out)


def test_a_row_the_teacher_cannot_take_is_still_a_reject(zoo, manifest, tmp_path):
    """A sample that makes the teacher raise, while other samples run, is a reject (found one at a time in its
    batch, judged by a sample that ran before); marked retryable, since the teacher failed, not its content."""
    out = tmp_path / "s"
    teacher = Failing(zoo["llava"], poison="poison", poison_error=ValueError("Image features and image tokens "
                                                                              "do not match"))
    res = run_cache(_cfg(zoo, manifest, out, 100000), teacher)
    store = TeacherStore(out)
    assert res.samples == len(store) == N_ROWS - 2
    rejects = {r["source_row"]: r["reason"] for r in store.rejects().to_pylist()}
    assert set(rejects) == {5, 9} and all("teacher forward failed" in r and "do not match" in r
                                          for r in rejects.values())
    assert store.parts[0].retryable_rows() == {5, 9}
    assert verify(store).ok


def test_the_first_sample_failing_alone_with_nothing_to_compare_is_a_reject(zoo, demo_manifest, tmp_path):
    """No sample has run yet and the batch holds only this one: nothing tells the teacher's fault from the row's,
    so it is a (retryable) reject and the job goes on, rather than stopping on every re-run."""
    m = _write_manifest(tmp_path / "m", demo_manifest, {0: "poison"})
    teacher = Failing(zoo["llava"], poison="poison", poison_error=RuntimeError("shape mismatch"))
    res = run_cache(_cfg(zoo, m, tmp_path / "s", 1), teacher)
    rejects = TeacherStore(tmp_path / "s").rejects().to_pylist()
    assert res.samples == N_ROWS - 1 and [r["source_row"] for r in rejects] == [0]


def test_retry_rejects_through_the_cli_commits_them_once(zoo, manifest, references, tmp_path):
    """Rows rejected because the teacher failed on them are run again by `--retry-rejects` and appended; each then
    counts once, as committed (reader and `--verify`), and holds what an uninterrupted run computes."""
    out = tmp_path / "s"
    teacher = Failing(zoo["llava"], poison="poison", poison_error=RuntimeError("CUDA out of memory (tried)"))
    run_cache(_cfg(zoo, manifest, out, 100000), teacher)
    assert sorted(r["source_row"] for r in TeacherStore(out).rejects().to_pylist()) == [5, 9]
    args = ("--teacher", zoo["llava"], "--manifest", manifest, "--output", out, "--dtype", "float32", "--device",
            "cpu", "--commit-every", 4, "--batch-tokens", 100000, "--no-progress")
    p = run_command("cache-teacher", *args, "--retry-rejects", env=ENV, drop_env=DROP, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 samples committed, 0 rejected" in p.stdout and "2 rejected rows run again" in p.stdout
    store = TeacherStore(out)
    assert len(store) == N_ROWS and store.rejects().num_rows == 0
    assert sorted(store.parts[0].samples.column("source_row").to_pylist()) == list(range(N_ROWS))
    ref = TeacherStore(references[1])
    for sid in ("r5", "r9"):
        assert torch.allclose(store.find(sid).features, ref.find(sid).features, atol=1e-5)
    v = run_command("inspect-cache", "--store", out, "--verify", env=ENV, timeout=300)
    assert v.returncode == 0 and "verify: OK" in v.stdout, v.stdout[-2000:]
    summary = run_command("inspect-cache", "--store", out, "--json", env=ENV, timeout=300)
    assert json.loads(summary.stdout)["summary"]["rejects"] == 0
    again = run_command("cache-teacher", *args, "--retry-rejects", env=ENV, drop_env=DROP, timeout=600)
    assert again.returncode == 0 and "0 rejected rows run again" in again.stdout, again.stderr[-2000:]


def test_retry_rejects_takes_an_older_stores_teacher_failures_and_verify_sees_a_row_recorded_twice(
        zoo, manifest, tmp_path):
    """A store written before rejects had kinds (no metadata): its "teacher forward failed" rejects are retried,
    the others not. A row recorded again although its reject was not retryable is damage for `--verify`."""
    out = tmp_path / "s"
    teacher = Failing(zoo["llava"], poison="poison", poison_error=RuntimeError("boom"))
    run_cache(_cfg(zoo, manifest, out, 100000), teacher)
    rejects_dir = out / "parts" / "shard-00000-of-00001" / "rejects"
    files = sorted(rejects_dir.glob("*.parquet"))
    for f in files:  # as an older writer wrote them: no kinds; row 9's reason one of the data's
        t = pq.read_table(f)
        md = {k: v for k, v in t.schema.metadata.items() if k != REJECT_KINDS.encode()}
        reasons = [r if row != 9 else "image 0 is not a file under the image root"
                   for row, r in zip(t.column("source_row").to_pylist(), t.column("reason").to_pylist())]
        t = t.set_column(2, "reason", pa.array(reasons, pa.string())).replace_schema_metadata(md)
        pq.write_table(t, f)
    res = run_cache(_cfg(zoo, manifest, out, 100000, retry_rejects=True))
    assert res.retried == 1 and res.samples == 1
    store = TeacherStore(out)
    assert [r["source_row"] for r in store.rejects().to_pylist()] == [9] and verify(store).ok
    f = next(f for f in files if 5 in pq.read_table(f).column("source_row").to_pylist())
    t = pq.read_table(f)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, REJECT_KINDS.encode():
                                              json.dumps({"retryable": [False] * t.num_rows})}), f)
    problems = [x["message"] for x in verify(TeacherStore(out)).failures]
    assert any("recorded twice, first [5]" in x for x in problems), problems


def test_nan_features_become_a_reject_naming_them(zoo, manifest, tmp_path):
    """In float32 (or bfloat16) a sample whose teacher values are NaN is a reject saying which and where; nothing
    non-finite is stored."""
    out = tmp_path / "s"
    res = run_cache(_cfg(zoo, manifest, out, 100000), Failing(zoo["llava"], nan_in="poison"))
    store = TeacherStore(out)
    assert res.samples == N_ROWS - 2 and verify(store).ok
    reasons = {r["source_row"]: r["reason"] for r in store.rejects().to_pylist()}
    assert set(reasons) == {5, 9}
    assert "non-finite teacher values: features: 5 NaN/inf values at label positions [0] of" in reasons[5], reasons[5]
    assert "topk_logprobs: 20 NaN/inf values at label positions [0] of" in reasons[5]


@pytest.fixture(scope="module")
def overflowing_teacher(zoo, tmp_path_factory) -> Path:
    """The tiny LLaVA with its final norm scaled to 60000: fine in float32, beyond float16's range (65504)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("fp16") / "llava-hot"
    shutil.copytree(zoo["llava"], out)
    weights = load_file(out / "model.safetensors")
    weights["language_model.model.norm.weight"] = weights["language_model.model.norm.weight"] * 60000
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_a_float16_overflow_stops_with_the_fix_and_float32_works(overflowing_teacher, manifest, tmp_path):
    """`cache-teacher --dtype float16` with a teacher that overflows float16: not a reject per sample but an error
    naming the dtype and the fix (exit 2); the same teacher in float32 writes a store that verifies."""
    common = ("--teacher", overflowing_teacher, "--manifest", manifest, "--device", "cpu", "--no-progress")
    p = run_command("cache-teacher", *common, "--output", tmp_path / "fp16", "--dtype", "float16", env=ENV,
                    drop_env=DROP, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "non-finite teacher values: features:" in p.stderr and "overflows --dtype float16" in p.stderr
    assert "--dtype bfloat16 (or float32)" in p.stderr and "Traceback" not in p.stderr
    assert len(TeacherStore(tmp_path / "fp16")) == 0
    res = run_cache(CacheConfig(teacher=str(overflowing_teacher), manifest=manifest, output=tmp_path / "fp32",
                                dtype="float32", device="cpu", progress=False, render_workers=0,
                                command=["test"]))  # in this process
    assert res.samples == N_ROWS and len(TeacherStore(tmp_path / "fp32")) == N_ROWS and verify(TeacherStore(
        tmp_path / "fp32")).ok


def test_engine_and_device_errors_are_known_by_name_and_message():
    """vLLM's own engine errors (its installed classes, when vLLM is here), torch's out of memory, CUDA messages;
    an error the request causes is not the engine's."""
    from genrecal_cache.teacher.failures import DEVICE, OUT_OF_MEMORY, classify

    assert classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == OUT_OF_MEMORY
    assert classify(RuntimeError("CUDA error: device-side assert triggered")) == DEVICE
    assert classify(ValueError("Image features and image tokens do not match")) is None
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = EngineDeadError()
    assert classify(wrapped) == DEVICE
    try:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead
    except ImportError:
        return
    assert classify(VLLMEngineDead()) == DEVICE
    assert classify(VLLMValidationError("prompt too long")) is None
