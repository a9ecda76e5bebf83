"""tests/warm.py: a command forked from the warm zygote behaves as a cold start does (argv, directory, environment,
stdio, exit code, signals, interpreter exit), and a launch whose environment an import would read starts cold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests import warm
from tests.helpers import ROOT, command_env, command_line, run_command, start_command

pytestmark = pytest.mark.skipif(os.environ.get("GENRECAL_COLD_COMMANDS") == "1", reason="commands start cold")


def _probe(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    z = warm.zygote(command_env())
    assert z.error is None, z.error
    return warm.WarmPopen([sys.executable, "-m", "tests.warm_probe", *args], zygote=z,
                          env=command_env({"GENRECAL_PROBE": "x", **(env or {})}), **kwargs)


def test_the_child_has_the_requests_argv_directory_environment_stdin_and_exit(tmp_path):
    draws = []
    for code in ("0", "3"):
        with _probe(code, "--flag", cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.communicate("to stdin", timeout=60)
        first, *rest = out.splitlines()
        seen = json.loads(first)
        assert p.returncode == int(code)
        assert seen["argv"] == [code, "--flag"] and seen["cwd"] == str(tmp_path) and seen["env"] == "x"
        assert seen["stdin"] == "to stdin" and not seen["own_session"]
        assert rest == ["thread joined", "atexit ran"]  # the interpreter's own exit: threads joined, then atexit
        draws.append((seen["random"], seen["numpy"]))
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]  # fresh random state in each child


def test_an_exception_a_signal_and_a_new_session(tmp_path):
    with _probe("raise", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.rstrip().endswith("RuntimeError: probe failed")
    p = _probe("0", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert p.poll() is None  # waiting on its stdin
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    p.stdin.close()
    p.stdout.close()


def test_console_commands_warm_and_cold_agree():
    for args, code in ((("cache-teacher", "--help"), 0), (("train-student", "--no-such-flag"), 2)):
        hot = run_command(*args, timeout=120)
        cold = subprocess.run(command_line(*args), capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr)
        assert hot.returncode == code


def test_an_environment_an_import_reads_gets_its_own_zygote():
    ours = start_command("inspect-cache", "--help", stdout=subprocess.DEVNULL)
    same = start_command("inspect-cache", "--help", env={"GENRECAL_X": "1"}, stdout=subprocess.DEVNULL)
    other = start_command("inspect-cache", "--help", env={"TRANSFORMERS_VERBOSITY": "error"}, stdout=subprocess.DEVNULL)
    assert all(type(p) is warm.WarmPopen and p.wait(timeout=120) == 0 for p in (ours, same, other))
    assert same._zygote is ours._zygote and other._zygote is not ours._zygote
    assert warm._import_env(command_env({"TRANSFORMERS_VERBOSITY": "error"})) in warm._zygotes


def test_cold_commands_on_request(monkeypatch):
    monkeypatch.setenv("GENRECAL_COLD_COMMANDS", "1")
    p = start_command("inspect-cache", "--help", stdout=subprocess.DEVNULL)
    assert type(p) is subprocess.Popen and p.wait(timeout=120) == 0


def test_torchruns_ranks_are_forked_warm_in_sessions_of_their_own_and_their_exit_codes_reach_it():
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tests.warm_probe", "rank"]
    done = warm.run([sys.executable, *args], env=command_env({"GENRECAL_PROBE": "x", "OMP_NUM_THREADS": "1"}),
                    cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    ranks = sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                   key=lambda seen: seen["rank"])
    assert [(r["rank"], r["warm"], r["own_session"], r["env"]) for r in ranks] == \
        [("0", True, True, "x"), ("1", True, True, "x")], done.stdout + done.stderr[-3000:]
    # Rank 0 exits 0 through a normal interpreter exit, rank 1 exits 3: torchrun reports it and fails.
    assert "atexit ran" in done.stdout and done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "exitcode  : 3" in done.stderr and "local_rank: 1" in done.stderr, done.stderr[-3000:]
