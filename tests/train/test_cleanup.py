"""A run stops everything it started: the prefetch thread is joined when training stops early (--max-steps),
`train-student` exits 0 every time, and `inspect-cache --plot` takes a text-only student and a stage folder."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import tqdm

from genrecal_cache.store.reader import TeacherStore
from genrecal_train.config import TrainConfig
from genrecal_train.data import Prefetcher
from genrecal_train.models import find_recalibrator, new_recalibrator
from genrecal_train.recalibrator import AnswerInputs
from genrecal_train.trainer import train
from tests.helpers import run_command


@pytest.fixture(scope="module")
def store(zoo, clean_manifest, tmp_path_factory) -> Path:
    from .test_trainer import _store

    return _store(zoo, clean_manifest, tmp_path_factory.mktemp("cleanup") / "store")


def test_prefetcher_close_joins_a_producer_blocked_on_a_full_queue():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    p = Prefetcher(endless(), depth=2)
    assert next(p) == 0
    deadline = time.monotonic() + 10
    while p._q.qsize() < 2 and time.monotonic() < deadline:  # the producer fills the queue, then blocks
        time.sleep(0.01)
    p.close()
    assert not p._thread.is_alive() and closed.is_set(), "the producer outlived close(), its generator unclosed"
    with pytest.raises(StopIteration):
        next(p)


def _library_thread(t: threading.Thread) -> bool:
    """zarr's process-wide I/O loop and its executor: started by the first store read, shared by everything."""
    return t.name.startswith(("zarr", "asyncio_"))


def test_no_thread_outlives_train_stopped_by_max_steps(store, zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # no tqdm monitor thread
    TeacherStore(store)[0]  # zarr's I/O threads exist before the run
    before = {t.ident for t in threading.enumerate()}
    cfg = TrainConfig(store=store, student=str(zoo["idefics3"]), output=tmp_path, stage="all", max_steps=2,
                      epochs=50, batch_size=1, block_size=2, reliance_every=1, heldout_fraction=0.3,
                      progress=False, device="cpu", command=["t"])
    train(cfg)
    left = [t.name for t in threading.enumerate() if t.ident not in before and not _library_thread(t)]
    assert left == [], f"threads left running after train(): {left}"
    for stage in (1, 2):  # the check at the stage's end is not repeated for a step --reliance-every just checked
        records = [json.loads(x) for x in (tmp_path / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "reliance_samples" in r] == [1, 2]


def test_train_student_stopped_by_max_steps_exits_0_every_time(store, zoo, tmp_path):
    for i in range(3):
        out = tmp_path / f"run{i}"
        r = run_command("train-student", "--store", store, "--student", zoo["idefics3"], "--output", out, "--stage",
                        "3", "--max-steps", "2", "--epochs", "100", "--batch-size", "1", "--block-size", "4",
                        "--no-progress", env={"OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 0, f"run {i}: exit {r.returncode}\n{r.stderr[-2000:]}"
        # it says what it starts from (no stage-2 student here) and what it trains
        assert "stage 3: fine-tuning" in r.stdout and "there is no stage-2 student" in r.stdout, r.stdout
        assert "language model" in r.stdout and "vision encoder 0 trained" in r.stdout, r.stdout
        assert (out / "stage3" / "final" / "student" / "config.json").exists()


def test_find_recalibrator_takes_a_stage_folder_or_its_subfolder(tmp_path, zoo):
    from transformers import AutoConfig

    recal = new_recalibrator(AutoConfig.from_pretrained(zoo["textlm"]), {"hidden_size": 64}, 1, True,
                             AnswerInputs.features)
    recal.save(tmp_path / "stage1" / "final" / "recalibrator")
    want = tmp_path / "stage1" / "final" / "recalibrator"
    for given in (want, want.parent, want.parent.parent):
        assert find_recalibrator(given) == want
    from genrecal_cache.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--recalibrator .*no Recalibrator there.*stage1/final"):
        find_recalibrator(tmp_path)


def test_plot_with_a_text_only_student_and_a_stage_folder(zoo, text_manifest, tmp_path):
    """The picture once died for a text-only student (an image-text-to-text class was forced) and for a stage
    folder given as --recalibrator."""
    pytest.importorskip("sklearn")
    from genrecal_cache.job.config import CacheConfig
    from genrecal_cache.job.launch import run_cache

    out = tmp_path / "store"
    run_cache(CacheConfig(teacher=str(zoo["textlm"]), manifest=text_manifest, output=out, dtype="float32",
                          device="cpu", question_features=True, progress=False, command=["t"]))
    run = tmp_path / "run"
    train(TrainConfig(store=out, student=str(zoo["textlm"]), output=run, stage="1", max_steps=1, batch_size=2,
                      heldout_fraction=0.0, reliance_every=0, progress=False, device="cpu", command=["t"]))
    png = tmp_path / "f.png"
    r = run_command("inspect-cache", "--store", out, "--plot", png, "--student", zoo["textlm"], "--recalibrator",
                    run / "stage1" / "final", "--plot-samples", "3", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
