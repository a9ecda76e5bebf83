"""`--config FILE` on every command: YAML or JSON, flags override it, unknown keys named with the closest option;
each run writes its resolved config, and `--config` of that file repeats the run. The demo runs from its configs."""

from __future__ import annotations

import json

import pytest
import yaml

from genrecal_train.config import TrainConfig
from tests.cache.job.test_cache_teacher import assert_same_store
from tests.helpers import ROOT, run_command

EXAMPLES = ROOT / "examples"


# Each command: one thread, no kill point.
ENV, DROP = {"OMP_NUM_THREADS": "1"}, ("GENRECAL_KILL_AT",)


@pytest.fixture(scope="module")
def demo_store(zoo, clean_manifest, tmp_path_factory):
    """cache-teacher from the demo's config file, the paths on the command line."""
    out = tmp_path_factory.mktemp("cfg") / "store"
    p = run_command("cache-teacher", "--config", EXAMPLES / "demo" / "cache-teacher.yaml", "--teacher", zoo["llava"],
                    "--manifest", clean_manifest, "--output", out, "--no-progress", env=ENV, drop_env=DROP, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_the_demo_cache_config_runs_and_its_resolved_config_repeats_the_run(demo_store, tmp_path):
    resolved = demo_store / "configs" / "shard-00000-of-00001.yaml"
    values = yaml.safe_load(resolved.read_text())
    assert values["question_features"] is True and values["topk"] == 5  # from the file
    assert values["output"] == str(demo_store) and values["progress"] is False  # from the command line
    p = run_command("cache-teacher", "--config", resolved, "--output", tmp_path / "again", env=ENV, drop_env=DROP,
                    timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_store(demo_store, tmp_path / "again")


def test_the_demo_train_config_runs_and_writes_its_resolved_config(zoo, demo_store, tmp_path):
    out = tmp_path / "run"
    p = run_command("train-student", "--config", EXAMPLES / "demo" / "train-student.yaml", "--store", demo_store,
                    "--student", zoo["idefics3"], "--output", out, "--stage", "3", "--max-steps", "2", "--batch-size",
                    "4", "--no-progress", env=ENV, drop_env=DROP, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    values = yaml.safe_load((out / "config.yaml").read_text())
    assert values["lr"] == 0.001 and values["warmup_steps"] == 10  # from the file
    assert values["stage"] == "3" and values["batch_size"] == 4  # the command line wins
    assert (out / "stage3" / "final" / "student" / "config.json").exists()


def test_every_example_config_names_only_real_options():
    from genrecal_cache.core.config import read_config
    from genrecal_cache.job.config import CacheConfig

    files = sorted(EXAMPLES.rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        read_config(f, CacheConfig if f.stem == "cache-teacher" else TrainConfig)


def test_bad_config_files_are_clear_errors(tmp_path, zoo, clean_manifest):
    cases = {
        "typo.yaml": ("batch_token: 3\n", "unknown option 'batch_token'; did you mean batch-tokens?"),
        "type.json": (json.dumps({"batch-tokens": "many"}), "batch-tokens must be an integer, got 'many'"),
        "list.yaml": ("- a\n- b\n", "must map option names to values, got a list"),
        "broken.yaml": ("topk: [1\n", "not valid YAML"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        p = run_command("cache-teacher", "--config", tmp_path / name, "--teacher", zoo["llava"], "--manifest",
                        clean_manifest, "--output", tmp_path / "s", env=ENV, drop_env=DROP, timeout=600)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (name, p.stderr[-1000:])
    p = run_command("cache-teacher", "--output", tmp_path / "s", env=ENV, drop_env=DROP, timeout=600)
    assert p.returncode == 2 and "missing --teacher, --manifest: give it on the command line or in --config" in p.stderr
    p = run_command("inspect-cache", "--config", tmp_path / "typo.yaml", env=ENV, drop_env=DROP, timeout=600)
    assert p.returncode == 2 and "unknown option 'batch_token'" in p.stderr
