"""Where manifest rows come from, as users have them: JSONL, a JSON array (streamed), Parquet, Arrow, a folder or
glob of such shards, a `datasets.save_to_disk` folder, or a Hub dataset in the local cache (`hub:ORG/NAME`).

Rows are numbered across the files in order, so a row's index is the same in every run and every shard; the
source's identity (each file's size and digest) lets a resumed job refuse data that changed.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genrecal_cache.core.digests import digest_files, kept_result
from genrecal_cache.core.errors import DatasetError
from genrecal_cache.core.locations import Location

from .rows import MAX_NESTING, Row, nested_too_deep

SHARD_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
HUB_PREFIX = "hub:"
_SPLITS = ("train", "validation", "valid", "val", "dev", "test")


@dataclass
class Source:
    """The files of one dataset (split), in row order; `root` is where relative image paths resolve by default (a
    `Location` on an object store: then `files` are local copies of the objects and `names` their keys under it)."""

    spec: str  # what the user passed to --manifest
    files: list[Path]
    root: Path | Location
    names: list[str] | None = None

    def rows(self) -> Iterator[Row]:
        """Every row of every file, numbered 0, 1, ... across the files."""
        index = 0
        for f in self.files:
            for record, error in _read_file(f):
                yield Row(index, record, error)
                index += 1

    def ids(self, column: str = "id") -> Iterator[Any]:
        """Each row's raw id from `column` (None where it has none), reading as little as each format allows."""
        for f in self.files:
            yield from _read_ids(f, column)

    def kept_ids(self, column: str, identity: dict[str, Any]) -> list[str | None]:
        """`ids(column)` as strings, read once per version of the data (`identity`: its files' digests) and kept
        beside the digests, so a restart, resume or another shard of the same data reads no file for them."""
        key = {"files": [f["sha256"] for f in identity["files"]], "column": column}
        return kept_result("ids", key, lambda: [None if x is None else str(x) for x in self.ids(column)])

    def identity(self, rehash: bool = False) -> dict[str, Any]:
        """What the store records of its source: every file's name (its place under the root, links not followed:
        in the Hugging Face cache every file is a link into `blobs/`), size and sha256 (of what it links to), each
        digest computed once per version of the file and kept (`rehash`: computed again)."""
        digests = digest_files(self.files, "file(s) of the dataset", rehash)
        names = self.names or [_relative(f, self.root) for f in self.files]
        return {"files": [{"name": n, "bytes": f.stat().st_size, "sha256": d}
                          for n, f, d in zip(names, self.files, digests)]}


def open_source(spec: str | Path, split: str | None = None) -> Source:
    """The source `spec` names: a file, a folder of shards (or a save_to_disk folder), a glob, or hub:ORG/NAME (on an
    object store: `remote_sources.open_dataset`)."""
    spec = str(spec).removeprefix("file://")
    if spec.startswith(HUB_PREFIX):
        return _hub(spec, split)
    if glob.has_magic(spec) and not _exists(Path(spec).expanduser()):  # `exp[1]/train.jsonl` is that file
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).suffix in SHARD_SUFFIXES)
        if not files:
            raise DatasetError(f"--manifest {spec}: the pattern matches no {'/'.join(SHARD_SUFFIXES)} file")
        return Source(spec, _only_split(files, split, spec), Path(_common_dir(files)))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(spec, path, split)
    if not path.is_file():
        raise DatasetError(f"--manifest {spec}: no such file or folder (pass a .jsonl, .json, .parquet or .arrow "
                           "file, a folder or glob of them, a datasets.save_to_disk folder, or hub:ORG/NAME)")
    if path.suffix not in SHARD_SUFFIXES:
        raise DatasetError(f"--manifest {spec}: unknown file type {path.suffix!r} (expected one of "
                           f"{', '.join(SHARD_SUFFIXES)})")
    return Source(spec, [path], path.parent)


def changed_file(recorded: dict[str, Any], now: dict[str, Any]) -> str | None:
    """How the source a store was written from differs from the one given now (None: it does not). Files are
    compared in order where the names agree, else by name. Stores written before names kept their folders hold
    bare file names for files behind links (the Hugging Face cache), maybe one name twice: those are compared
    file by file."""
    old_files, new_files = recorded.get("files", []), now.get("files", [])
    old_names, new_names = [f["name"] for f in old_files], [f["name"] for f in new_files]
    if old_names != new_names and old_names == [n.rsplit("/", 1)[-1] for n in new_names]:
        new_names = old_names
    for name in sorted(set(old_names) | set(new_names)):
        if name not in new_names:
            return f"{name} is no longer part of it"
        if name not in old_names:
            return f"{name} was not part of it"
    same_order = old_names == new_names
    pairs = zip(old_files, new_files) if same_order else (
        (old_files[old_names.index(n)], new_files[new_names.index(n)]) for n in sorted(set(old_names)))
    for a, b in pairs:
        if a["sha256"] != b["sha256"]:
            return f"{b['name']} has changed since (sha256 {a['sha256'][:12]}… then, {b['sha256'][:12]}… now)"
    if not same_order:
        return "its files come in another order"
    return None


# --- what a spec names -----------------------------------------------------------------------------------------

def _folder(spec: str, path: Path, split: str | None) -> Source:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _saved(spec, path, split)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SHARD_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DatasetError(f"--manifest {spec}: the folder holds no {'/'.join(SHARD_SUFFIXES)} file")
    return Source(spec, _only_split(files, split, spec, path), path)


def _saved(spec: str, path: Path, split: str | None) -> Source:
    """A `datasets` save_to_disk folder (a Dataset, or a DatasetDict of splits): its Arrow files, as datasets
    itself lists them."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as e:
        raise DatasetError(f"--manifest {spec} is a datasets.save_to_disk folder: pip install datasets ({e})") from e
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise DatasetError(f"--manifest {spec}: datasets cannot load this save_to_disk folder ({e})") from e
    if isinstance(ds, DatasetDict):
        if split is None and len(ds) > 1:
            raise DatasetError(f"--manifest {spec} holds the splits {', '.join(ds)}: pass --split (e.g. --split "
                               f"{next(iter(ds))})")
        name = split or next(iter(ds))
        if name not in ds:
            raise DatasetError(f"--split {name}: {spec} holds the splits {', '.join(ds)}")
        ds = ds[name]
    files = [Path(f["filename"]) for f in ds.cache_files]
    if _is_view(ds):  # a filtered view: its rows are not the files' rows
        raise DatasetError(f"--manifest {spec}: the dataset was saved as a view of another (select/filter); save "
                           "it with flatten_indices() first")
    return Source(spec, files, path)


def _is_view(ds: Any) -> bool:
    """Whether a `datasets.Dataset` has an indices mapping (select/filter/shuffle made it a view of its Arrow
    table). datasets (5.x) has no public way to ask (`cache_files` lists a mapping only when it is on disk):
    this reads its private `_indices`, and another datasets may need this updated."""
    return ds._indices is not None


def _hub(spec: str, split: str | None) -> Source:
    """A Hub dataset already in the local Hugging Face cache (nothing is downloaded)."""
    repo = spec[len(HUB_PREFIX):]
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except Exception as e:  # not cached (LocalEntryNotFoundError), or a malformed id
        raise DatasetError(f"--manifest {spec}: not in the local Hugging Face cache ({type(e).__name__}); download "
                           f"it where the Hub is reachable (`huggingface-cli download --repo-type dataset {repo}`) "
                           "and copy the cache (HF_HOME) here") from None
    return _folder(spec, folder, split or "train")


def split_of(file: Path, base: Path | None) -> str | None:
    """The split a shard belongs to by its name (`train-00000-of-00004.parquet`) or folder (`train/`)."""
    parts = file.relative_to(base).parts if base is not None else (file.name,)
    for part in parts:
        stem = part.split(".")[0]
        for s in _SPLITS:
            if stem == s or stem.startswith((f"{s}-", f"{s}_")):
                return s
    return None


def _only_split(files: list[Path], split: str | None, spec: str, base: Path | None = None) -> list[Path]:
    splits = {f: split_of(f, base) for f in files}
    if split is not None:
        chosen = [f for f in files if splits[f] == split]
        if not chosen:
            found = ", ".join(sorted({s for s in splits.values() if s})) or "no split names; drop --split"
            raise DatasetError(f"--split {split}: no file of {spec} belongs to it (found: {found})")
        return chosen
    named = sorted({s for s in splits.values() if s})
    if len(named) > 1:
        raise DatasetError(f"--manifest {spec} holds the splits {', '.join(named)}: pass --split (e.g. --split "
                           f"{named[0]})")
    return files


def _common_dir(files: list[Path]) -> str:
    return os.path.commonpath([os.path.abspath(f.parent) for f in files])  # links not followed (see _relative)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to be a path
        return False


def _relative(f: Path, root: Path) -> str:
    """A file's name in the source's identity: its path under the root as listed (a link's own place, so two
    configs' `train.parquet` stay apart), else under the root's target, else its whole resolved path."""
    for path, base in ((os.path.abspath(f), os.path.abspath(root)), (f.resolve(), root.resolve())):
        if Path(path).is_relative_to(base):
            return Path(path).relative_to(base).as_posix()
    return str(f.resolve())


# --- reading one file ------------------------------------------------------------------------------------------

def _read_file(path: Path) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """(record, None) per good row, (None, why) per row that cannot be decoded."""
    if path.suffix == ".parquet":
        yield from ((r, None) for r in _parquet_records(path))
    elif path.suffix == ".arrow":
        yield from ((r, None) for r in _arrow_records(path))
    elif _is_json_array(path):
        yield from _json_array(path)
    else:
        yield from _jsonl(path)


def _read_ids(path: Path, column: str) -> Iterator[Any]:
    if path.suffix in (".parquet", ".arrow"):
        for batch in _parquet_batches(path, [column]) if path.suffix == ".parquet" else _arrow_batches(path):
            yield from batch.column(column).to_pylist() if column in batch.schema.names else [None] * batch.num_rows
    elif _is_json_array(path):
        yield from _json_array_ids(path, column)
    else:
        for record, _ in _jsonl(path):
            yield record.get(column) if isinstance(record, dict) else None


def _jsonl(path: Path) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    name = path.name
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield None, f"{name} line {n} is not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                yield None, f"{name} line {n} is empty"
                continue
            try:
                record = json.loads(line)
                deep = nested_too_deep(record)
            except json.JSONDecodeError as e:
                yield None, f"malformed JSON on {name} line {n}: {e.msg} at column {e.colno}"
                continue
            except RecursionError:  # json recurses per level: ~1000 levels end it with a traceback
                deep = True
            if deep:
                yield None, f"{name} line {n} is nested more than {MAX_NESTING} levels deep"
                continue
            if not isinstance(record, dict):
                yield None, f"{name} line {n} is a JSON {type(record).__name__}, not an object"
                continue
            yield record, None


def _is_json_array(path: Path) -> bool:
    """A `.json` file whose first non-blank character opens an array (LLaVA, ShareGPT4V, LLaMA-Factory files)."""
    if path.suffix != ".json":
        return False
    with path.open("rb") as f:
        while block := f.read(4096):
            text = block.lstrip()
            if text:
                return text.startswith(b"[")
    return False


def _json_array(path: Path) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """The items of a JSON array, streamed (bounded memory whatever the file's size)."""
    import ijson

    n = 0
    with path.open("rb") as f:
        try:
            for item in ijson.items(f, "item", use_float=True):
                n += 1
                if nested_too_deep(item):  # ijson builds any depth; repr and pickle would recurse on it
                    yield None, f"{path.name} item {n - 1} is nested more than {MAX_NESTING} levels deep"
                elif isinstance(item, dict):
                    yield item, None
                else:
                    yield None, f"{path.name} item {n - 1} is a JSON {type(item).__name__}, not an object"
        except ijson.JSONError as e:
            raise DatasetError(f"{path}: the JSON array is malformed after item {n - 1} ({e}); fix the file (every "
                               "row before that point was read)") from None


def _json_array_ids(path: Path, column: str) -> Iterator[Any]:
    """Each item's top-level `column`, from the parser's events (no item is built)."""
    import ijson

    current, started = None, False
    with path.open("rb") as f:
        try:
            for prefix, event, value in ijson.parse(f, use_float=True):
                if prefix == "item" and event not in ("map_key", "end_map", "end_array"):  # an item starts
                    if started:
                        yield current
                    current, started = None, True
                elif prefix == f"item.{column}" and event in ("string", "number"):
                    current = value
        except ijson.JSONError as e:
            raise DatasetError(f"{path}: the JSON array is malformed ({e})") from None
    if started:
        yield current


def _parquet_batches(path: Path, columns: list[str] | None = None) -> Iterator[Any]:
    """Record batches of a Parquet file; `columns` that the file lacks are left out (a batch may then have none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"cannot read Parquet file {path}: {e}") from e
    if columns is not None and not set(columns) & set(pf.schema_arrow.names):  # only the row counts
        for i in range(pf.num_row_groups):
            yield pa.record_batch({"_": pa.nulls(pf.metadata.row_group(i).num_rows)})
        return
    yield from pf.iter_batches(batch_size=256, columns=columns and [c for c in columns if c in pf.schema_arrow.names])


def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    for batch in _parquet_batches(path):
        yield from batch.to_pylist()


def _arrow_batches(path: Path) -> Iterator[Any]:
    """Record batches of an Arrow IPC file or stream (datasets writes streams), memory-mapped."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"cannot read Arrow file {path}: {e}") from e
    yield from batches


def _arrow_records(path: Path) -> Iterator[dict[str, Any]]:
    for batch in _arrow_batches(path):
        yield from batch.to_pylist()


def read_manifest(spec: str | Path, split: str | None = None) -> Iterator[Row]:
    """Every row of the source `spec` names, in order."""
    return open_source(spec, split).rows()
