"""Two processes under torchrun (gloo, CPU) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..conftest import ROOT
from .test_trainer import _store


def _run(store, zoo, out, nproc: int, batch: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GENRECAL_KILL_AT", None)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(29500 + nproc), "-m"] if nproc > 1 else [sys.executable, "-m"])
    args = ["genrecal_train.cli", "--store", str(store), "--student", str(zoo["idefics3"]), "--output", str(out),
            "--stage", "all", "--batch-size", str(batch), "--block-size", "3", "--epochs", "1", "--lr", "1e-3",
            "--heldout-fraction", "0", "--log-every", "1", "--reliance-every", "0", "--device", "cpu",
            "--no-progress"]
    return subprocess.run(launch + args, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_two_processes_match_one_with_the_same_global_batch(zoo, clean_manifest, tmp_path):
    """With blocks of one rank's batch (12 samples: four full blocks of 3), global step k of two ranks holds
    blocks 2k and 2k+1, exactly the samples of one process's step k with a batch of 6."""
    store = _store(zoo, clean_manifest, tmp_path / "store")
    one = _run(store, zoo, tmp_path / "one", 1, 6)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(store, zoo, tmp_path / "two", 2, 3)
    assert two.returncode == 0, two.stderr[-3000:]
    for stage in (1, 2, 3):
        a, b = ([json.loads(x) for x in (tmp_path / d / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
        la, lb = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
        assert len(la) == len(lb) == 2, (la, lb)
        assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(la, lb)), (stage, la, lb)
