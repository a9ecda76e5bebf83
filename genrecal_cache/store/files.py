"""A store's small objects read from where it lives (`core/locations.py`): on an object store the commit Parquet
files, the parts' `zarr.json` and the tokenizer come in concurrent batches (each request costs a round trip),
and the teacher tokenizer is copied to a local folder, since transformers loads only from one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from genrecal_cache.core.errors import StoreServerError
from genrecal_cache.core.locations import Location


def names_under(loc: Location) -> list[str]:
    """The names directly under `loc`, sorted; [] where there is nothing."""
    try:
        return loc.listdir()
    except (FileNotFoundError, NotADirectoryError):
        return []


def read_many(root: Location, keys: list[str]) -> dict[str, bytes]:
    """The objects `root/key` that exist, by key, fetched concurrently (fsspec's `cat` of many paths); a server or
    credentials failure is the one-line StoreServerError naming the store."""
    if not keys:
        return {}
    paths = [root.join(k).path for k in keys]
    try:
        got = root.fs.cat(paths, on_error="return")
    except Exception as e:
        raise (root.error(e, "reading") or e) from None
    out = {}
    for key, path in zip(keys, paths):
        value = got.get(path, FileNotFoundError(path))
        if isinstance(value, FileNotFoundError):
            continue
        if isinstance(value, BaseException):
            err = root.error(value, "reading")
            if err is None:
                raise value
            raise err from None
        out[key] = value
    return out


def object_listing(root: Location) -> dict[str, tuple[int, float]]:
    """Every object under `root` with its size and modification time (seconds since the epoch), by its key relative
    to `root` (one listing)."""
    try:
        found = root.fs.find(root.path, detail=True)
    except Exception as e:
        raise (root.error(e, "listing") or e) from None
    prefix = root.path.rstrip("/") + "/"
    return {p[len(prefix):]: (int(info.get("size") or 0), _mtime(info)) for p, info in found.items()
            if p.startswith(prefix) and info.get("type") != "directory"}


def _mtime(info: dict[str, Any]) -> float:
    """An fsspec listing entry's modification time: S3's LastModified, else `mtime`/`created` (0 when none)."""
    t = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


def object_sizes(root: Location) -> dict[str, int]:
    """Every object under `root` with its size, by its key relative to `root` (one listing)."""
    return {key: size for key, (size, _) in object_listing(root).items()}


def cache_root() -> Path:
    """Where copies of remote stores' tokenizers are kept (`$XDG_CACHE_HOME/genrecal/tokenizers`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genrecal" / "tokenizers"


def local_copy(folder: Location, identity: dict[str, Any]) -> Path | None:
    """A local folder holding the files of the remote `folder` (the teacher tokenizer: a few small files), kept
    under `cache_root()` by the store's URL and `identity` (a store's tokenizer never changes: its digest is part
    of the identity), so it is fetched once per machine; None where the folder is empty or missing. Written to a
    temporary folder and renamed into place, so processes that fetch it at once never see half of it."""
    key = hashlib.sha256(json.dumps([folder.url, identity], sort_keys=True, default=str).encode()).hexdigest()[:32]
    dest = cache_root() / key
    if dest.is_dir():
        return dest
    names = names_under(folder)
    blobs = read_many(folder, names)  # sub-folders list as names but read as nothing: a tokenizer has none
    if not blobs:
        return None
    tmp = dest.with_name(f"{key}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    for name, data in blobs.items():
        (tmp / name).write_bytes(data)
    try:
        tmp.rename(dest)
    except OSError:  # another process put it there first: the same files
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
    return dest


def server_failure(root: Location | None, exc: BaseException, doing: str) -> StoreServerError | None:
    """The one-line error `exc` means when it is the server's or the credentials' (never for a local store)."""
    if root is None or root.is_local:
        return None
    if isinstance(exc, StoreServerError):
        return exc
    err = root.error(exc, doing)
    return err if isinstance(err, StoreServerError) else None
