"""Two processes under torchrun (gloo, CPU) train exactly like one process with the same global batch: with DDP
(the default), with FSDP2 (--fsdp) and with DataLoader workers (--num-workers 2)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import warm
from tests.helpers import ROOT

from .test_trainer import _store


def _run(store, zoo, out, nproc: int, batch: int, *extra: str, stage: str = "all") -> Path:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GENRECAL_KILL_AT", None)
    # --standalone: a free port, so runs beside another checkout's tests do not collide
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m"]
              if nproc > 1 else [sys.executable, "-m"])
    args = ["genrecal_train.cli", "--store", str(store), "--student", str(zoo["idefics3"]), "--output", str(out),
            "--stage", stage, "--batch-size", str(batch), "--block-size", "3", "--epochs", "1", "--lr", "1e-3",
            "--heldout-fraction", "0", "--log-every", "1", "--reliance-every", "0", "--device", "cpu",
            "--no-progress", *extra]
    done = warm.run(launch + args, env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def store(zoo, clean_manifest, tmp_path_factory) -> Path:
    return _store(zoo, clean_manifest, tmp_path_factory.mktemp("dist") / "store")


@pytest.fixture(scope="module")
def one(store, zoo, tmp_path_factory) -> Path:
    """One process (this one: `_run(..., nproc=1, batch=6)`'s run), batch 6. With blocks of one rank's batch (12
    samples: four full blocks of 3), global step k of two ranks with batch 3 holds blocks 2k and 2k+1, exactly the
    samples of this run's step k."""
    from genrecal_train.config import TrainConfig
    from genrecal_train.trainer import train

    out = tmp_path_factory.mktemp("one") / "out"
    train(TrainConfig(store=store, student=str(zoo["idefics3"]), output=out, stage="all", batch_size=6, block_size=3,
                      epochs=1, lr=1e-3, heldout_fraction=0.0, log_every=1, reliance_every=0, device="cpu",
                      progress=False, command=["test"]))
    return out


def assert_same_losses(one: Path, two: Path, stages: tuple[int, ...] = (1, 2, 3)) -> None:
    for stage in stages:
        a, b = ([json.loads(x) for x in (d / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
                for d in (one, two))
        la, lb = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
        assert len(la) == len(lb) == 2, (la, lb)
        assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(la, lb)), (stage, la, lb)


def test_two_processes_with_ddp_match_one_with_the_same_global_batch(store, zoo, one, tmp_path):
    assert_same_losses(one, _run(store, zoo, tmp_path / "two", 2, 3))


def test_two_processes_with_fsdp_match_one_and_save_a_full_student(store, zoo, one, tmp_path):
    from transformers import AutoModelForImageTextToText

    two = _run(store, zoo, tmp_path / "two", 2, 3, "--fsdp")
    assert_same_losses(one, two)
    for stage, what, file in ((3, "student", "model.safetensors"), (2, "recalibrator", "recalibrator.safetensors")):
        a, b = (load_file(d / f"stage{stage}" / "final" / what / file) for d in (one, two))
        assert a.keys() == b.keys(), f"{what}: keys differ from one process's"
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), f"{what}: gathered weights differ"
    _, info = AutoModelForImageTextToText.from_pretrained(two / "stage3" / "final" / "student",
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    s1, s2 = (torch.load(d / "stage2" / "checkpoint" / "trainer_state.pt", weights_only=True) for d in (one, two))
    assert s1["optimizer"]["state"].keys() == s2["optimizer"]["state"].keys(), "optimizer state format differs"


@pytest.mark.slow  # README "Reliability and tests": what make test covers of it
def test_two_processes_with_dataloader_workers_match_one(store, zoo, one, tmp_path):
    assert_same_losses(one, _run(store, zoo, tmp_path / "two", 2, 3, "--num-workers", "2", stage="1"), stages=(1,))


def test_fsdp_needs_torchrun(store, zoo, tmp_path, monkeypatch):
    from genrecal_cache.core.errors import ConfigError
    from genrecal_train.config import TrainConfig

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process, whatever launched the tests
    with pytest.raises(ConfigError, match="--fsdp .*torchrun --nproc-per-node"):
        TrainConfig(store=store, student=str(zoo["idefics3"]), output=tmp_path, fsdp=True)


def test_a_rank_whose_data_runs_out_first_still_takes_part(store, zoo, tmp_path):
    """Blocks of 5 (5, 5, 2 samples): rank 0 gets 7 samples, rank 1 five. With batches of 3 and two micro-batches
    per step, step 2 has one micro-batch on rank 0 and none on rank 1, which runs a pass with weight 0."""
    out = _run(store, zoo, tmp_path / "two", 2, 3, "--grad-accum", "2", "--block-size", "5", stage="1")
    recs = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]
    assert (out / "stage1" / "final" / "student" / "model.safetensors").exists()
