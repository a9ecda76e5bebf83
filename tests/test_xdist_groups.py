"""`make test`'s split between workers holds: under `pytest -n 2 --dist loadgroup` a file's tests run on one worker
and every test that uses `vllm_engine` on one worker (tests/grouping.py, conftest's hook; pytest-xdist#1386 broke it silently)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.grouping import durations_from_log, heaviest_first
from tests.helpers import ROOT

CONFTEST = '''
import json, os
from pathlib import Path
import pytest
from tests.grouping import pytest_collection_modifyitems  # noqa: F401  (the grouping under test)

@pytest.fixture(scope="session")
def vllm_engine():
    return None

@pytest.fixture(autouse=True)
def record(request):
    with open(Path(__file__).parent / "workers.jsonl", "a") as f:
        f.write(json.dumps([request.node.nodeid.split("@")[0], os.environ.get("PYTEST_XDIST_WORKER")]) + "\\n")
'''


def test_a_files_tests_and_the_vllm_tests_each_run_on_one_worker(tmp_path: Path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name in ("a", "b", "c"):
        (tmp_path / f"test_{name}.py").write_text(
            "import pytest\n\n@pytest.mark.parametrize('i', range(4))\ndef test_plain(i):\n    pass\n\n\n"
            "@pytest.mark.parametrize('i', range(3))\ndef test_engine(i, vllm_engine):\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                           "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in (os.environ.get("PYTHONPATH"), str(ROOT), str(ROOT / "tools")) if p)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = [json.loads(line) for line in (tmp_path / "workers.jsonl").read_text().splitlines()]
    assert len(runs) == 21
    groups: dict[str, set[str]] = {}
    for nodeid, worker in runs:
        group = "vllm" if "test_engine" in nodeid else nodeid.split("::")[0]
        groups.setdefault(group, set()).add(worker)
    assert len(groups) == 4 and all(len(w) == 1 for w in groups.values()), groups


def test_groups_start_longest_first_and_unmeasured_ones_count_as_the_median():
    rank = heaviest_first(["a", "new", "b", "c", "d"], {"a": 1.0, "b": 50.0, "c": 5.0, "d": 5.0})
    assert sorted(rank, key=rank.get) == ["b", "new", "c", "d", "a"]  # median 5.0: "new" ties c and d, first
    assert heaviest_first(["x", "y"], {}) == {"x": 0, "y": 1}  # nothing measured: collection order


def test_durations_are_summed_per_group_from_pytests_output():
    log = ("===== slowest durations =====\n12.50s call     tests/a.py::test_x@tests/a.py\n"
           "0.25s setup    tests/a.py::test_y[1]@tests/a.py\n3.00s teardown tests/b.py::test_z@vllm\n"
           "(5 durations < 0.005s hidden.)\n1 passed in 16.00s\n")
    assert durations_from_log(log) == {"tests/a.py": 12.8, "vllm": 3.0}


def test_a_log_of_only_the_slowest_durations_is_refused(tmp_path):
    """Rewriting durations.json from `--durations=25` would forget every other group: refused, the file kept."""
    log = tmp_path / "log.txt"
    log.write_text("===== slowest 25 durations =====\n12.50s call     tests/a.py::test_x@tests/a.py\n")
    done = subprocess.run([sys.executable, "-m", "tests.grouping", str(log)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "only the slowest 25 durations: run with --durations=0" in done.stderr, done.stderr
