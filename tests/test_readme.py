"""The README's commands run as written: its quick start (tiny zoo, demo data, cache-teacher, inspect-cache,
train-student, eval-student) and the real-format example after it, each block taken from between its markers
and run by bash (`set -euo pipefail`) in a fresh folder laid out like the clone's root (`.venv`, `tools/`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"


def block(name: str) -> str:
    """The ```bash block between `<!-- name... -->` and `<!-- /name -->` in README.md."""
    m = re.search(rf"<!-- {name}\b[^>]*-->\s*```bash\n(.*?)```\s*<!-- /{name} -->", README.read_text(), re.DOTALL)
    assert m, f"README.md has no <!-- {name} --> ```bash block <!-- /{name} -->"
    return m.group(1)


def _venv() -> Path:
    """The virtualenv running the tests (`.venv` in the clone when it is the one)."""
    if (ROOT / ".venv" / "bin" / "activate").exists():
        return ROOT / ".venv"
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").exists():
        return Path(sys.prefix)
    pytest.fail("the README's commands activate a virtualenv: run the tests from `make test` (it makes .venv) or "
                "inside a virtualenv")


def run_block(name: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run one README block with bash in `cwd`; the failing command, if any, is named in stderr."""
    script = "set -euo pipefail\ntrap 'echo \"README command failed: $BASH_COMMAND\" >&2' ERR\n" + block(name)
    venv_bin = str(_venv() / "bin")
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    env.pop("GENRECAL_KILL_AT", None)
    return subprocess.run(["bash", "-c", script], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder standing in for the clone's root: its `.venv` and `tools/`, nothing written into the checkout."""
    root = tmp_path_factory.mktemp("clone")
    (root / ".venv").symlink_to(_venv(), target_is_directory=True)
    (root / "tools").symlink_to(ROOT / "tools", target_is_directory=True)
    return root


def test_readme_starts_with_make_demo_and_make_test():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), re.DOTALL).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]


@pytest.fixture(scope="module")
def quick_start(clone: Path) -> subprocess.CompletedProcess:
    """The quick start, run once: its teacher and images are also the real-format example's."""
    return run_block("quickstart", clone, timeout=300)


def test_quick_start_runs_as_written(clone, quick_start):
    res = quick_start
    assert res.returncode == 0, (res.stderr[-4000:], res.stdout[-2000:])
    out = clone / "out"
    assert (out / "zoo" / "llava" / "config.json").exists() and (out / "zoo" / "idefics3" / "config.json").exists()
    assert (out / "data" / "manifest.jsonl").exists()
    assert "12 samples committed, 4 rejected" in res.stderr + res.stdout
    assert "verify: OK" in res.stdout and "spot-check: OK" in res.stdout
    for k in (1, 2, 3):
        assert (out / "run" / f"stage{k}" / "final" / "student" / "config.json").exists()
    assert (out / "run" / "stage1" / "final" / "recalibrator" / "recalibrator.safetensors").exists()
    preds = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and all("prediction" in p for p in preds)  # the 16 good rows (bad ones skipped)


def test_real_format_example_runs_as_written(clone, quick_start):
    assert quick_start.returncode == 0, "the quick start, which makes this example's teacher, failed"
    res = run_block("realformat", clone, timeout=180)
    assert res.returncode == 0, (res.stderr[-4000:], res.stdout[-2000:])
    both = res.stderr + res.stdout
    assert "4 samples committed, 0 rejected" in both
    assert "1 rows had an id seen before and were renamed id#k" in both
    assert "a1#2" in res.stdout
