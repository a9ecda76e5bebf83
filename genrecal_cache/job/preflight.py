"""What a `cache-teacher` job checks and plans before it loads a teacher or writes a row: the output folder, the
data against what the store was written from, and the sample id of every manifest row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genrecal_cache.core.errors import ConfigError, IncompatibleStoreError
from genrecal_cache.core.locations import Location
from genrecal_cache.data.sources import changed_file
from genrecal_cache.store.files import names_under
from genrecal_cache.store.format import finished, read_meta

from .config import DuplicateIds


def check_output(store: Location) -> None:
    """--output is a folder this user can write (new, empty, or a teacher store), or a prefix on an object store the
    server lets us reach (empty, or a teacher store)."""
    if not store.is_local:
        store.check_reachable()  # one line naming the URL: credentials, bucket, server
        if not store.join("zarr.json").exists() and names_under(store):
            raise ConfigError(f"--output {store} holds objects but no teacher store (no zarr.json); pass a new or "
                              "empty prefix")
        return
    path = Path(store.path)
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--output {path}: {parent} is not writable; choose a directory you can write to")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {path} is a file; pass a directory for the store")
    if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").exists():
        raise ConfigError(f"--output {path} is a non-empty directory that is not a teacher store; "
                          "pass a new or empty directory")


def plan_ids(ids: Iterable[Any], mode: DuplicateIds) -> tuple[int, dict[int, str], dict[int, tuple[str, int]]]:
    """One pass over the rows' ids: the row count, the rows whose repeated id is renamed (`suffix`: the k-th
    occurrence of `x` becomes `x#k`, never an id the data already has) and, with `reject`, each repeat with
    its id and the row of its first occurrence. Every shard computes the same plan."""
    sids = [str(x) if x is not None else f"row-{i}" for i, x in enumerate(ids)]
    taken, first, count = set(sids), {}, {}
    renamed: dict[int, str] = {}
    rejected: dict[int, tuple[str, int]] = {}
    for i, sid in enumerate(sids):
        if sid not in first:
            first[sid] = i
            continue
        if mode == DuplicateIds.reject:
            rejected[i] = (sid, first[sid])
            continue
        count[sid] = count.get(sid, 1) + 1
        new = f"{sid}#{count[sid]}"
        while new in taken:
            new += "#"
        taken.add(new)
        renamed[i] = new
    return len(sids), renamed, rejected


def check_source(path: Path | Location, source: dict[str, Any]) -> None:
    """A store resumed on other data is refused, naming the file that differs."""
    if not finished(path):
        return
    recorded = read_meta(path).get("source")
    why = changed_file(recorded or {}, source) if recorded is not None else "the store records no source"
    if why is not None:
        raise IncompatibleStoreError(f"{path} was written from other data: {why}. Re-run on the data it was "
                                     "written from, or write to a new --output")
