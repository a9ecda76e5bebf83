"""Digests of large files (a teacher's weights) computed once per file version and kept in the user's cache folder
(`$XDG_CACHE_HOME/genrecal/digests`, default `~/.cache/...`), keyed by the resolved path, size, mtime, ctime and inode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Where digests are kept: the user's cache folder, never the model's (often read-only, or shared by others)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genrecal" / "digests"


def _key(path: Path) -> tuple[str, Path]:
    """The file version's key and its entry. ctime and inode as well as size and mtime: a copy that keeps the
    mtime (`cp -p`, `rsync -t`) onto the same path still changes one of them."""
    st = path.stat()
    key = json.dumps([str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return key, cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def kept_digest(path: Path) -> str | None:
    """The digest kept for this version of `path` (resolved), or None when it was never computed."""
    key, entry = _key(Path(path).resolve())
    try:
        kept = json.loads(entry.read_text())
        return kept["sha256"] if kept.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, unreadable or damaged: recompute
        return None


def cached_digest(path: Path, compute: Callable[[Path], str]) -> str:
    """`compute(path)` (a sha256 hex digest, e.g. `data.sources.file_digest`) for this version of the file, computed
    once and kept. Jobs started together (--data-parallel-size copies) wait for the one hashing it rather than
    each reading the file. A cache folder that cannot be written only means the digest is computed again next time."""
    real = Path(path).resolve()
    found = kept_digest(real)
    if found is not None:
        return found
    key, entry = _key(real)
    with _locked(entry.with_suffix(".lock")):
        found = kept_digest(real)  # another job may have kept it while this one waited
        if found is not None:
            return found
        digest = compute(real)
        if _key(real)[0] != key:  # the file changed while it was read: keep nothing
            return digest
        try:
            tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "sha256": digest}))
            os.replace(tmp, entry)  # whole or absent
        except OSError:
            pass
    return digest


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """An exclusive lock on `lock`, or none where it cannot be had (a read-only cache, a file system without flock)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")  # noqa: SIM115 (closed below, after the lock is released)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        f.close()  # releases the lock
