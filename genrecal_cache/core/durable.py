"""Making files durable: `fsync` of a file or folder, and of a whole tree before a rename or a record declares it
complete (store heads and commits, trainer checkpoints). A power loss then keeps the old state or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """fsync one file, or one folder (its entries: a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`."""
    for d, _, files in os.walk(folder):
        for name in files:
            fsync(Path(d) / name)
        fsync(Path(d))
