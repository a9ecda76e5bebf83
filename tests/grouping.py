"""How `make test` (`pytest -n 2 --dist loadgroup`) splits the tests between its workers: conftest's hook, in a
module that imports only pytest so tests/test_xdist_groups.py can check it in a pytest of its own at little cost.

`python -m tests.grouping LOG` rewrites tests/durations.json from the `--durations=0` output of a `make test` run.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest

DURATIONS = Path(__file__).with_name("durations.json")  # seconds per group, from a clean-clone `make test`
_LINE = re.compile(r"^([\d.]+)s (?:setup|call|teardown)\s+\S+@(\S+)$")


def group_of(item: pytest.Item) -> str:
    """A test file's tests form one group, and every test that uses `vllm_engine` another."""
    return "vllm" if "vllm_engine" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]


def heaviest_first(groups: list[str], seconds: dict[str, float]) -> dict[str, int]:
    """Each group's rank when the groups are run longest first (a group not measured yet counts as the median
    one), ties in the given order: xdist hands the groups out in that order, so no worker is left with a long one
    at the end."""
    default = statistics.median(seconds.values()) if seconds else 0.0
    order = sorted(range(len(groups)), key=lambda i: (-seconds.get(groups[i], default), i))
    return {groups[i]: rank for rank, i in enumerate(order)}


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups to name the tests' work units
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `pytest -n N --dist loadgroup` (`make test`): a test file's tests stay on one worker (its module
    fixtures are built once), every test that uses `vllm_engine` goes to one worker, where they share its engines
    (two engines at once would also compete for the two cores), and the groups start longest first."""
    for item in items:
        if not any(m.name == "xdist_group" for m in item.iter_markers()):
            item.add_marker(pytest.mark.xdist_group(group_of(item)))
    names = [_group_name(next(item.iter_markers("xdist_group"))) for item in items]
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    rank = heaviest_first(list(dict.fromkeys(names)), seconds)
    items[:] = [item for _, _, item in sorted(zip(map(rank.get, names), range(len(items)), items))]


def _group_name(mark: pytest.Mark) -> str:
    return mark.args[0] if mark.args else mark.kwargs.get("name", "default")  # as xdist reads it


def durations_from_log(text: str) -> dict[str, float]:
    """Seconds per group from pytest's `--durations=0` lines (`12.34s call  tests/x.py::test_y@group`)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if m := _LINE.match(line.strip()):
            out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(1))
    return {k: round(v, 1) for k, v in sorted(out.items())}


def _fail(message: str) -> None:
    print(f"python -m tests.grouping: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        _fail("usage: python -m tests.grouping LOG  (LOG: the output of `PYTEST_ADDOPTS=--durations=0 make test`)")
    try:
        text = Path(sys.argv[1]).read_text()
    except OSError as e:
        _fail(f"cannot read {sys.argv[1]}: {e.strerror or e}")
    if partial := re.search(r"slowest (\d+) durations", text):  # the rest of the groups would be forgotten
        _fail(f"{sys.argv[1]} lists only the slowest {partial.group(1)} durations: run with --durations=0")
    found = durations_from_log(text)
    if not found:
        _fail(f"{sys.argv[1]}: no `--durations=0` lines with an @group: run `PYTEST_ADDOPTS=--durations=0 make test`")
    DURATIONS.write_text(json.dumps(found, indent=1) + "\n")
    print(f"{DURATIONS}: {len(found)} groups, {sum(found.values()):.0f} s in all")
