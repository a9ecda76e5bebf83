"""Digests of large files (a teacher's weights, a dataset's files) computed once per file version and kept in the
user's cache folder (`$XDG_CACHE_HOME/genrecal/digests`, default `~/.cache/...`), keyed by the resolved path, size,
mtime, ctime and inode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


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


def file_digest(path: Path) -> str:
    """The sha256 of the file's bytes (hex)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_files(files: Sequence[Path], what: str, rehash: bool = False) -> list[str]:
    """Each file's sha256, computed only for files new or changed since their digest was kept (all of them with
    `rehash`); says on stderr how much it reads, for `what` ("weight file(s) of the teacher")."""
    todo = files if rehash else [f for f in files if kept_digest(f) is None]
    if todo:
        size = sum(Path(f).stat().st_size for f in todo) / 2**30
        print(f"cache-teacher: hashing {len(todo)} {what} ({size:.2f} GiB){'' if rehash else ', once'}: the "
              f"digests are kept in {cache_dir()}", file=sys.stderr)
    return [cached_digest(f, file_digest, rehash) for f in files]


def cached_digest(path: Path, compute: Callable[[Path], str], rehash: bool = False) -> str:
    """`compute(path)` (a sha256 hex digest, e.g. `file_digest`) for this version of the file, computed once and
    kept (`rehash`: computed again, and kept). Jobs started together (--data-parallel-size copies) wait for the one
    hashing it rather than each reading the file. A cache folder that cannot be written only means the digest is
    computed again next time."""
    real = Path(path).resolve()
    found = None if rehash else kept_digest(real)
    if found is not None:
        return found
    key, entry = _key(real)
    with _locked(entry.with_suffix(".lock")):
        found = None if rehash else kept_digest(real)  # another job may have kept it while this one waited
        if found is not None:
            return found
        digest = compute(real)
        if _key(real)[0] == key:  # else the file changed while it was read: keep nothing
            _keep(entry, {"key": key, "sha256": digest})
    return digest


def kept_result(kind: str, key: Any, compute: Callable[[], Any]) -> Any:
    """`compute()` (a JSON value) once per `key` (JSON; made of content digests, so a kept result is never stale),
    kept beside the digests, e.g. a dataset's row ids under its files' digests."""
    key = json.dumps(key, sort_keys=True)
    entry = cache_dir() / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        kept = json.loads(entry.read_text())
        if kept.get("key") == key:
            return kept["value"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, unreadable or damaged: compute
        pass
    value = compute()
    _keep(entry, {"key": key, "value": value})
    return value


def _keep(entry: Path, content: dict[str, Any]) -> None:
    """Write `entry` whole or not at all; a cache folder that cannot be written keeps nothing."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(content))
        os.replace(tmp, entry)
    except OSError:
        pass


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
