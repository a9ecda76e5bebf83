"""`train-student --resume` continues the same run: SIGKILLed and resumed, a stage with dropout in the student and the
Recalibrator takes the losses of an uninterrupted one (every generator saved, per rank); a resume with other options,
another store or another starting student is refused naming each difference; an output that holds a run is only
resumed or overwritten, never silently started again."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genrecal_cache.core.errors import ConfigError
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_train import checkpoint
from genrecal_train.config import TrainConfig
from genrecal_train.recalibrator import Recalibrator, RecalibratorConfig
from genrecal_train.trainer import Trainer, train
from tests import warm
from tests.helpers import ROOT, command_env, run_command, start_command

from .test_trainer import _cfg, _losses, _store


@pytest.fixture(scope="module")
def store(zoo, demo_manifest, tmp_path_factory) -> Path:
    return _store(zoo, demo_manifest, tmp_path_factory.mktemp("resume") / "store")


@pytest.fixture(scope="module")
def dropout(store, zoo, tmp_path_factory) -> dict[str, Path]:
    """A copy of the student with attention dropout (language model and vision tower) and a stage-1 Recalibrator
    for it with dropout: every training pass of stage 2 draws from the generators in both."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("dropout")
    student = shutil.copytree(zoo["idefics3"], root / "student")
    config = json.loads((student / "config.json").read_text())
    config["text_config"]["attention_dropout"] = config["vision_config"]["attention_dropout"] = 0.2
    (student / "config.json").write_text(json.dumps(config))
    teacher = TeacherStore(store).meta["teacher"]
    Recalibrator(RecalibratorConfig.from_student(
        AutoConfig.from_pretrained(student), teacher["hidden_size"], dropout=0.2,
        teacher={k: teacher[k] for k in ("name_or_path", "vocab_size", "head_digest")})).save(root / "recalibrator")
    return {"student": student, "recalibrator": root / "recalibrator"}


def _stage2(store, dropout, out: Path, workers: int, device: str = "cpu", kill_at: str | None = None,
            nproc: int = 1) -> subprocess.CompletedProcess:
    """`train-student --stage 2 --resume` from the dropout Recalibrator, as users run it (killed at `kill_at`; under
    torchrun with `nproc` processes)."""
    args = ["--store", store, "--student", dropout["student"], "--recalibrator", dropout["recalibrator"],
            "--output", out, "--stage", "2", "--batch-size", "3", "--epochs", "2", "--lr", "1e-3", "--save-every", "3",
            "--log-every", "1", "--reliance-every", "0", "--report-to", "none", "--device", device, "--no-progress",
            "--resume", "--num-workers", workers]
    env = {"OMP_NUM_THREADS": "1", **({"GENRECAL_KILL_AT": kill_at} if kill_at else {})}
    if nproc > 1:  # --standalone: a free port, so runs beside another checkout's tests do not collide
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
               "genrecal_train.cli", *map(str, args)]
        return warm.run(cmd, command_env(env, ["GENRECAL_KILL_AT"]), cwd=ROOT, capture_output=True, text=True,
                        timeout=1800)
    if not kill_at:
        return run_command("train-student", *args, env=env, drop_env=["GENRECAL_KILL_AT"], timeout=900)
    # Killed: its output goes to a file, not a pipe (a leftover worker would keep a pipe open), and nothing of
    # its process group may outlive it for long: DataLoader workers end with their trainer.
    log = out.parent / f"{out.name}-killed.log"
    with log.open("w") as f:
        p = start_command("train-student", *args, env=env, stdout=f, stderr=f, text=True, start_new_session=True)
        p.wait(timeout=900)
    deadline = time.monotonic() + 20
    while _group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group_alive(p.pid)
    if left:
        os.killpg(p.pid, signal.SIGKILL)
    assert not left, "DataLoader workers outlived their killed trainer"
    return subprocess.CompletedProcess(p.args, p.returncode, "", log.read_text())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def uninterrupted(store, dropout, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    ref = _stage2(store, dropout, out, workers=0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return _losses(out, 2)


def _kill_and_resume(store, dropout, out: Path, workers: int, device: str = "cpu", nproc: int = 1
                     ) -> tuple[list[float], list[float]]:
    """The losses of a run killed after step 5, and after it was resumed from its step-3 checkpoint."""
    killed = _stage2(store, dropout, out, workers, device, kill_at="train-step:2:5", nproc=nproc)
    assert killed.returncode == (-9 if nproc == 1 else 1), killed.stderr[-2000:]
    before = _losses(out, 2)
    assert len(before) == 5
    again = _stage2(store, dropout, out, workers, device, nproc=nproc)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _losses(out, 2, "resumed_from") == [3], "did not resume from the step-3 checkpoint"
    return before, _losses(out, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_with_dropout_gives_the_same_losses(store, dropout, uninterrupted, tmp_path, workers):
    """Killed at step 5 and resumed from the step-3 checkpoint: the losses of one uninterrupted run without workers,
    although every pass draws dropout masks in the student and the Recalibrator, also when DataLoader workers read
    the store (a DataLoader draws its workers' seed from torch's generator when it starts: not from training's)."""
    _, resumed = _kill_and_resume(store, dropout, tmp_path / "run", workers)
    assert len(uninterrupted) == len(resumed) > 5 and uninterrupted == resumed, (uninterrupted, resumed)


@pytest.mark.slow
def test_two_processes_resume_each_with_its_own_generators(store, dropout, tmp_path):
    """Under torchrun (DDP, gloo) with dropout, killed and resumed: the losses of an uninterrupted two-process run,
    each rank's generators saved and put back on that rank. (On CPU the ranks' generators stay equal, as dropout
    draws one seed per call, so rank 0's everywhere would pass too; on CUDA the offsets depend on each rank's
    shapes.)"""
    ref = _stage2(store, dropout, tmp_path / "ref", 0, nproc=2)
    assert ref.returncode == 0, ref.stderr[-2000:]
    _, resumed = _kill_and_resume(store, dropout, tmp_path / "run", 0, nproc=2)
    assert _losses(tmp_path / "ref", 2) == resumed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sigkill_then_resume_with_dropout_on_a_gpu(store, dropout, tmp_path):
    """On CUDA dropout draws from the device's generator, saved and restored with the checkpoint: the step after
    the checkpoint takes the loss the killed run took (its weights, batch and masks; GPU backward passes may differ
    in the last bits from run to run, so later steps are compared to a tolerance)."""
    before, resumed = _kill_and_resume(store, dropout, tmp_path / "run", 0, "cuda")
    assert resumed[:4] == before[:4], (before, resumed)
    assert resumed[4] == pytest.approx(before[4], rel=1e-3)


def test_every_generator_comes_back_from_a_checkpoint(tmp_path):
    """Python's, numpy's and torch's generators, through trainer_state.pt (loaded with weights_only)."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    checkpoint.write_state(tmp_path, {"rng": [checkpoint.rng_state(cuda=torch.cuda.is_available())]})
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist())
    checkpoint.set_rng_state(checkpoint.read_state(tmp_path)["rng"][0])
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist()) == first


def _stage3(store, student, out: Path, *extra: object) -> subprocess.CompletedProcess:
    return run_command("train-student", "--store", store, "--student", student, "--output", out, "--stage", "3",
                       "--batch-size", "4", "--lr", "1e-3", "--save-every", "1", "--log-every", "1",
                       "--report-to", "none", "--device", "cpu", "--no-progress", *extra,
                       env={"OMP_NUM_THREADS": "1"}, drop_env=["GENRECAL_KILL_AT"], timeout=900)


@pytest.fixture(scope="module")
def a_run(store, zoo, tmp_path_factory) -> Path:
    """An output holding a 2-step stage-3 run (a checkpoint of step 2, final/, metrics); tests copy it. The run of
    `_stage3(..., "--max-steps", "2")`, in this process."""
    out = tmp_path_factory.mktemp("a_run") / "run"
    train(TrainConfig(store=store, student=str(zoo["idefics3"]), output=out, stage="3", batch_size=4, lr=1e-3,
                      save_every=1, log_every=1, report_to="none", device="cpu", progress=False, max_steps=2,
                      command=["test"]))
    return out


def test_an_output_holding_a_run_is_resumed_or_overwritten_never_started_again(store, zoo, a_run, tmp_path):
    out = shutil.copytree(a_run, tmp_path / "run")
    metrics = (out / "stage3" / "metrics.jsonl").read_bytes()
    again = _stage3(store, zoo["idefics3"], out, "--max-steps", "2")
    assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr[-2000:]
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (out / "stage3" / "metrics.jsonl").read_bytes() == metrics
    assert checkpoint.read_state(out / "stage3" / "checkpoint")["step"] == 2
    both = _stage3(store, zoo["idefics3"], out, "--resume", "--overwrite")
    assert both.returncode == 2 and "pass one of them" in both.stderr, both.stderr[-2000:]

    (out / "notes.txt").write_text("mine")
    fresh = _stage3(store, zoo["idefics3"], out, "--max-steps", "1", "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "--overwrite: removed" in fresh.stdout
    assert (out / "notes.txt").read_text() == "mine", "--overwrite removed a file train-student did not write"
    assert [r["step"] for r in map(json.loads, (out / "stage3" / "metrics.jsonl").read_text().splitlines())] == [1]
    assert checkpoint.read_state(out / "stage3" / "checkpoint")["step"] == 1


def test_resume_refuses_another_option_and_takes_another_log_interval(store, zoo, a_run, tmp_path):
    out = shutil.copytree(a_run, tmp_path / "run")
    other = _stage3(store, zoo["idefics3"], out, "--max-steps", "3", "--resume", "--lr", "2e-3", "--seed", "7")
    assert other.returncode == 2, other.stderr[-2000:]
    assert "--lr: 0.001 (checkpoint) -> 0.002 (now)" in other.stderr, other.stderr[-2000:]
    assert "--seed: 0 (checkpoint) -> 7 (now)" in other.stderr and "Traceback" not in other.stderr
    assert checkpoint.read_state(out / "stage3" / "checkpoint")["step"] == 2
    logged = _stage3(store, zoo["idefics3"], out, "--max-steps", "3", "--resume", "--log-every", "2")
    assert logged.returncode == 0, logged.stderr[-2000:]
    assert _losses(out, 3, "resumed_from") == [2] and len(_losses(out, 3)) == 3


def test_resume_refuses_another_store_or_another_starting_student(store, zoo, demo_manifest, tmp_path):
    """The store is compared by its content (attributes, parts and their committed samples), the starting student
    by its path and a digest of its config and weights' index: a student changed in place is another student."""
    student = shutil.copytree(zoo["idefics3"], tmp_path / "student")
    kw = dict(stage="3", max_steps=1, save_every=1, report_to="none")
    train(_cfg(store, {"idefics3": student}, tmp_path / "run", **kw))
    fewer = tmp_path / "fewer"
    run_cache(CacheConfig(teacher=str(zoo["qwen2vl"]), manifest=demo_manifest, output=fewer, dtype="float32",
                          device="cpu", question_features=True, max_samples=8, progress=False, command=["t"]))
    resume = dict(kw, max_steps=2, resume=True)
    with pytest.raises(ConfigError) as e:
        Trainer(_cfg(fewer, {"idefics3": student}, tmp_path / "run", **resume), 3)
    assert [x.split(":")[0] for x in _differences(e.value)] == ["store parts.shard-00000-of-00001"], str(e.value)
    assert re.search(r"1\d samples, ids \w+ \(checkpoint\) -> \d samples, ids \w+ \(now\)", str(e.value))
    config = json.loads((student / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-3
    (student / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        Trainer(_cfg(store, {"idefics3": student}, tmp_path / "run", **resume), 3)
    assert [x.split(":")[0] for x in _differences(e.value)] == ["starting student digest"], str(e.value)


def _differences(error: Exception) -> list[str]:
    """The lines of a refused resume that name a difference."""
    return [x.strip() for x in str(error).splitlines() if x.startswith("  ")]


def test_the_options_that_may_change_are_real_and_documented():
    """MAY_CHANGE_ON_RESUME names options of train-student, and docs/DESIGN.md's resume section lists each."""
    from dataclasses import fields

    from genrecal_train.config import TrainConfig
    from genrecal_train.identity import MAY_CHANGE_ON_RESUME

    assert MAY_CHANGE_ON_RESUME <= {f.name for f in fields(TrainConfig)}
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    section = design.split("**What may change**")[1].split("**An output holding a run.**")[0]
    assert {k for k in MAY_CHANGE_ON_RESUME if f"`--{k.replace('_', '-')}`" not in section} == set()


def test_out_of_disk_while_saving_stops_cleanly_and_resumes(store, zoo, a_run, tmp_path):
    """A full disk while a checkpoint is saved: exit 2 with what to do, no traceback, the last checkpoint intact;
    the same command with --resume goes on from it."""
    out = shutil.copytree(a_run, tmp_path / "run")
    args = ("--store", store, "--student", zoo["idefics3"], "--output", out, "--stage", "3", "--batch-size", "4",
            "--lr", "1e-3", "--save-every", "1", "--log-every", "1", "--report-to", "none", "--device", "cpu",
            "--no-progress", "--max-steps", "3", "--resume")
    full = run_command("train-student", *args, env={"OMP_NUM_THREADS": "1",
                                                    "GENRECAL_ENOSPC_AT": "checkpoint-commit:checkpoint"},
                       drop_env=["GENRECAL_KILL_AT"], timeout=900)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "out of disk space" in full.stderr and "--resume" in full.stderr and "Traceback" not in full.stderr
    assert checkpoint.read_state(out / "stage3" / "checkpoint")["step"] == 2
    done = _stage3(store, zoo["idefics3"], out, "--max-steps", "3", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert checkpoint.read_state(out / "stage3" / "checkpoint")["step"] == 3
