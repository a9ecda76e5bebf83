"""`--help` of the four commands renders its text literally: brackets in a flag's help (`genrecal[lora]`,
`hidden_states[k]`, `[required]`) are shown, not taken for rich markup and dropped."""

from __future__ import annotations

import pytest

from tests.helpers import COMMANDS, run_command


def _help(command: str) -> str:
    res = run_command(command, "--help", env={"COLUMNS": "100"}, timeout=120)
    assert res.returncode == 0, res.stderr
    return " ".join(res.stdout.split())  # wrapping aside


def test_bracketed_help_text_is_shown():
    train = _help("train-student")
    assert "Needs genrecal[lora]." in train
    assert "of a copy on an object store. [required]" in train
    cache = _help("cache-teacher")
    assert "hidden_states[k];" in cache
    assert "[required]" in cache


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"train-student", "cache-teacher"}))
def test_every_command_renders_help_the_same_way(command):
    text = _help(command)
    assert text.startswith(f"Usage: {command} [OPTIONS]")
    assert "[required]" in text and "--config <path>" in text and "╭" not in text  # plain text, no rich panels
