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


def _expand(spec: str) -> list[int]:
    """The task ids of `sbatch --array=SPEC`, as Slurm expands it (ranges, :steps, lists; a %limit changes none)."""
    out: list[int] = []
    for item in spec.split("%")[0].split(","):
        bounds, _, by = item.partition(":")
        lo, _, hi = bounds.partition("-")
        out += range(int(lo), int(hi or lo) + 1, int(by or 1))
    return out


def _slurm_env(spec: str, task: int, step: bool = True) -> dict[str, str]:
    """What Slurm sets in task `task` of `sbatch --array=SPEC`: its id, the array's size, lowest and highest id and
    the step of its range (1 for a list; `step=False`: no step at all)."""
    ids = _expand(spec)
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(len(ids)),
           "SLURM_ARRAY_TASK_MIN": str(min(ids)), "SLURM_ARRAY_TASK_MAX": str(max(ids))}
    if step:
        env["SLURM_ARRAY_TASK_STEP"] = spec.split("%")[0].partition(":")[2] or "1"
    return env


@pytest.mark.parametrize("spec", ["0-6:2", "5-8", "0-9%2", "1-7:2%3", "4", "0-15:5", "3-3"])
def test_shard_auto_maps_any_slurm_range_onto_contiguous_parts(spec):
    """Stepped, offset, limited by %: the tasks' ids map one to one onto parts 0..n-1 of n (before, --array=0-6:2
    gave 0/4, 2/4, 4/4, 6/4: parts 1 and 3 never written, tasks 4 and 6 refused)."""
    ids = _expand(spec)
    shards = [shard_from_env(_slurm_env(spec, t)) for t in ids]
    assert shards == [f"{i}/{len(ids)}" for i in range(len(ids))], shards


@pytest.mark.parametrize("spec,step", [("1,3,7", True), ("1,3,7", False), ("1,3,5,7", True), ("0-2,9", True)])
def test_shard_auto_refuses_a_list_it_cannot_map_and_says_the_fix(spec, step):
    """A list of ids that is not one range (whether a step of 1 or none is set for it): the environment does not say
    the other tasks' ids, so no task can know its part; refused with the fix. 1,3,5,7 with a step of 1 cannot be
    told from a list with gaps, so it is refused too (its fix: --array=1-7:2)."""
    with pytest.raises(ConfigError, match=r"not one evenly spaced range.*--array=0-\d.*--shard i/"):
        shard_from_env(_slurm_env(spec, _expand(spec)[1], step=step))


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


def test_a_stepped_array_writes_a_complete_store_and_a_list_is_refused(zoo, clean_manifest, tmp_path):
    """--array=0-2:2 (tasks 0 and 2): parts 0 and 1 of 2, a complete store; --array=1,3,7: exit 2 with the fix."""
    out = tmp_path / "s"
    job = ["--teacher", zoo["llava"], "--manifest", clean_manifest, "--output", out, "--shard", "auto", "--dtype",
           "float32", "--device", "cpu", "--no-progress", "--max-samples", "4"]
    for task in (0, 2):
        p = run_command("cache-teacher", *job, env={"OMP_NUM_THREADS": "1", **_slurm_env("0-2:2", task)},
                        drop_env=("GENRECAL_KILL_AT",), timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    store = TeacherStore(out)
    assert [q.name for q in store.parts] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert store.completeness() == ([], []) and len(store) == 4
    p = run_command("cache-teacher", *job, env={"OMP_NUM_THREADS": "1", **_slurm_env("1,3,7", 3)},
                    drop_env=("GENRECAL_KILL_AT",), timeout=600)
    assert p.returncode == 2 and "--array=0-2" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


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
