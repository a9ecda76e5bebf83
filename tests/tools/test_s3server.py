"""`python tools/s3server.py`: its usage on --help (exit 0, stdout) and on a missing or flag-like DIR (exit 2, stderr);
the server itself is the `s3_server` fixture's, tested wherever a test uses it."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_usage_on_help_and_on_bad_arguments():
    for args, code in ((["--help"], 0), ([], 2), (["--port"], 2)):
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "s3server.py"), *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == code, done.stderr
        assert "usage: python tools/s3server.py DIR" in (done.stdout if code == 0 else done.stderr)
