"""`make test`'s split between workers holds: under `pytest -n 2 --dist loadgroup` a file's tests run on one worker
and every test that uses `vllm_engine` on one worker (conftest's grouping; pytest-xdist#1386 broke it silently)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

CONFTEST = '''
import json, os
from pathlib import Path
import pytest
from tests.conftest import pytest_collection_modifyitems  # noqa: F401  (the grouping under test)

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
