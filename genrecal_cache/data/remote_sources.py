"""A dataset on an object store (`--manifest s3://bucket/data/train.jsonl`, a prefix or a glob): its files copied
once into a local cache (by URL, size and ETag) and read from there as local files are; image paths resolve under
the URL's folder (`images.load_image` with a `Location` root).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from genrecal_cache.core.errors import DatasetError
from genrecal_cache.core.locations import Location

from .sources import SHARD_SUFFIXES, Source, open_source, split_of


def open_dataset(spec: str, split: str | None = None, storage_options: dict[str, Any] | None = None) -> Source:
    """`--manifest` wherever it lives: an object store URL (`open_remote`), else `sources.open_source`."""
    if "://" in spec and not spec.startswith("file://"):
        return open_remote(spec, split, storage_options or {})
    return open_source(spec, split)


def image_root(given: Path | str | None, source: Source, options: dict[str, Any]) -> Path | Location:
    """Where relative image paths resolve: `--image-root` (a folder; an object store prefix stays text until here),
    else the source's folder."""
    if given is None:
        return source.root
    return Location.of(given, options) if isinstance(given, str) else given


def open_remote(spec: str, split: str | None, options: dict[str, Any]) -> Source:
    """Files on an object store: copied once into a local cache (by URL, size and ETag: a changed object is fetched
    again) and read from there; image paths resolve under the URL's folder (the prefix of a glob or folder)."""
    loc = Location.of(spec, options)
    loc.check_reachable()
    try:
        if glob.has_magic(loc.path):
            keys = sorted(loc.fs.glob(loc.path))
            base = loc.path[: loc.path.index(next(c for c in loc.path if c in "*?["))].rsplit("/", 1)[0]
        elif loc.fs.isdir(loc.path):
            keys, base = sorted(loc.fs.find(loc.path)), loc.path
        else:
            keys, base = [loc.path], loc.path.rsplit("/", 1)[0]
        infos = {k: loc.fs.info(k) for k in keys if Path(k).suffix in SHARD_SUFFIXES}
    except FileNotFoundError:
        infos = {}
    except Exception as e:
        raise (loc.error(e, "listing the dataset") or e) from None
    infos = {k: i for k, i in infos.items() if not any(p.startswith(".") for p in k[len(base):].split("/"))}
    if not infos:
        raise DatasetError(f"--manifest {spec}: no {'/'.join(SHARD_SUFFIXES)} object there (pass an object, a prefix "
                           "or a glob of them)")
    root = Location(f"{loc.protocol}://{base}", loc.fs, base, loc.protocol, loc.storage_options)
    files = [local_copy(loc, k, i) for k, i in infos.items()]
    names = [k[len(base):].lstrip("/") for k in infos]
    if split is not None:
        kept = [j for j, n in enumerate(names) if any(split_of(Path(x), None) == split for x in n.split("/"))]
        if not kept:
            raise DatasetError(f"--manifest {spec}: no object of split {split!r}")
        files, names = [files[j] for j in kept], [names[j] for j in kept]
    return Source(spec, files, root, names)


def local_copy(loc: Location, key: str, info: dict[str, Any]) -> Path:
    """The object `key` in the local cache of remote datasets, fetched unless this version is there already."""
    from genrecal_cache.core.digests import cache_dir

    version = json.dumps([loc.protocol, key, info.get("size"), info.get("ETag") or info.get("etag")])
    dest = cache_dir().parent / "datasets" / hashlib.sha256(version.encode()).hexdigest()[:32] / Path(key).name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        try:
            loc.fs.get_file(key, str(tmp))
        except Exception as e:
            tmp.unlink(missing_ok=True)  # no half-fetched copy left behind
            raise (loc.error(e, "reading the dataset") or e) from None
        os.replace(tmp, dest)
    return dest
