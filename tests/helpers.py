"""What tests share besides fixtures: the repository root, the VLMs of the tiny zoo, and running a console
command the way users do (a subprocess, its exit code checked by the caller)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLMS = ("llava", "idefics3", "qwen2vl")
COMMANDS = {  # console command -> how to start it from this interpreter (the installed script does the same)
    "cache-teacher": ["-m", "genrecal_cache", "cache-teacher"],
    "inspect-cache": ["-m", "genrecal_cache", "inspect-cache"],
    "train-student": ["-m", "genrecal_train", "train-student"],
    "eval-student": ["-m", "genrecal_train", "eval-student"],
}


def run_command(command: str, *args: object, env: dict[str, str] | None = None, timeout: float = 900,
                cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess:
    """`command ARGS...` in a subprocess with this interpreter, as a user runs it; returns the completed process
    (`returncode`, `stdout`, `stderr` as text). `env` adds to (not replaces) this process's environment."""
    cmd = [sys.executable, *COMMANDS[command], *map(str, args)]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd or ROOT,
                          capture_output=True, text=True, **kwargs)
