"""Launching at scale: `cache-teacher --shard auto` from a Slurm job array or torchrun's environment, and the
example sbatch scripts (shell syntax, options that exist)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from genrecal_cache.core.errors import ConfigError
from genrecal_cache.job.config import shard_from_env
from genrecal_cache.store.reader import TeacherStore
from tests.helpers import ROOT, run_command


def test_shard_auto_reads_slurm_then_torchrun():
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == "3/8"
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1",
                           "SLURM_ARRAY_TASK_COUNT": "8", "RANK": "0", "WORLD_SIZE": "2"}) == "3/8"
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == "1/2"
    with pytest.raises(ConfigError, match="--shard auto needs SLURM_ARRAY_TASK_ID"):
        shard_from_env({})


def test_one_script_serves_every_array_task(zoo, clean_manifest, tmp_path):
    out = tmp_path / "s"
    for task in ("1", "2"):  # an --array=1-2 job: tasks 1 and 2 write parts 0 and 1 of 2
        env = {"OMP_NUM_THREADS": "1", "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": "1",
               "SLURM_ARRAY_TASK_COUNT": "2"}
        p = run_command("cache-teacher", "--teacher", zoo["llava"], "--manifest", clean_manifest, "--output", out,
                        "--shard", "auto", "--dtype", "float32", "--device", "cpu", "--no-progress",
                        env=env, drop_env=("GENRECAL_KILL_AT",), timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    store = TeacherStore(out)
    assert [q.name for q in store.parts] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert (out / "configs" / "shard-00001-of-00002.yaml").read_text().count("shard: 1/2") == 1


@pytest.mark.parametrize("script", sorted((ROOT / "examples" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_examples_are_valid_shell_with_real_options(script):
    from genrecal_cache.core.config import read_config
    from genrecal_cache.job.config import CacheConfig
    from genrecal_train.config import TrainConfig

    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH" in text
    srun = text.replace("\\\n", " ").split("\nsrun ", 1)[1].split("\n", 1)[0]  # the command, continuations joined
    cls = CacheConfig if "cache-teacher" in srun else TrainConfig
    config = re.search(r"--config (\S+)", srun).group(1)
    read_config(ROOT / config, cls)  # the config it names exists and holds real options
    flags = set(re.findall(r"\s--([a-z][a-z-]+)", srun))
    flags -= {"config", "nnodes", "nproc-per-node", "rdzv-backend", "rdzv-endpoint", "rdzv-id", "no-progress"}
    names = {n.replace("_", "-") for n in cls.__dataclass_fields__}
    assert flags <= names, flags - names
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(script)]).returncode == 0
