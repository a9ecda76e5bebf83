"""Where a part writer's files go: a local folder (files written beside, fsynced and renamed into place, one writer
per part by `flock`) or an object store (whole objects by PUT, the commit point a conditional PUT, one writer per
part by a lease). `PartWriter` speaks only to these (docs/store.md, "The commit protocol on an object store").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from genrecal_cache.core.durable import fsync
from genrecal_cache.core.errors import StoreError
from genrecal_cache.core.faults import fault_point
from genrecal_cache.core.locations import Location

from .format import COMMIT_FILE, WRITER_FILE, commit_files, read_commit, shard_file, shard_key
from .lease import LEASE_FILE, LEASE_SECONDS, Lease, LeaseHeldError
from .shards import sync_folders, write_shard

_ZARR_PARTIAL = re.compile(r".*\.[0-9a-f]{32}\.partial")  # zarr's LocalStore temp files (zarr 3.x)


def flock(f: Any, flags: int, root: object) -> None:
    """`flock`, or an error saying what to do where the file system has no locks (Lustre mounted without `flock`):
    the one-writer-per-part guarantee rests on it, so a store is never written without it."""
    try:
        fault_point("flock")
        fcntl.flock(f, flags)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
            raise
        raise StoreError(f"the file system of {root} does not support file locks ({e.strerror}), which keep two "
                         "cache-teacher jobs from writing one part: write the store on a file system that does "
                         "(local disk, NFS v4, Lustre mounted with -o flock)") from None


@contextlib.contextmanager
def creation_lock(root: Location, seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Held while a store's root is created or checked, so concurrent writers do it one at a time: the root's `.lock`
    (flock) locally; on an object store the root's `create.lease.json`, waited for while another job creates."""
    if root.is_local:
        path = Path(root.path)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / ".lock", "a") as f:
            flock(f, fcntl.LOCK_EX, path)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    lease, deadline = Lease(root.join("create.lease.json"), f"the root of {root}", seconds), time.time() + 2 * seconds
    while True:
        try:
            lease.acquire()
            break
        except LeaseHeldError:
            if time.time() > deadline:
                raise
            time.sleep(1.0)
    try:
        yield
    finally:
        lease.release()


def table_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


class LocalPartFiles:
    """A part in a local folder: files written beside their name, fsynced and renamed into place."""

    def __init__(self, root: Location, part: str):
        self.root, self.part = Path(root.path), part
        self.dir = self.root / "parts" / part
        self._lock: Any = None

    def acquire(self) -> None:
        """Hold the part's `.lock` while this writer lives; another writer of the part is refused at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / ".lock", "a")
        try:
            flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB, self.root)
        except BlockingIOError:
            self._lock.close()
            raise StoreError(f"another cache-teacher is writing part {self.part} of {self.root}; wait for it, or "
                             "give this job another --shard") from None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()

    def prepare(self, subs: tuple[str, ...]) -> None:
        for sub in subs:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    def last_commit(self, sub: str) -> dict[str, Any] | None:
        commits = commit_files(self.dir / sub)
        return read_commit(commits[-1]) if commits else None

    def clean(self, subs: tuple[str, ...], seq: int) -> None:
        """Delete the tail of a crashed commit: the writer's temporary files, its files numbered >= `seq`, and zarr's
        temporary files (a kill inside a zarr write leaves `<file>.<hex>.partial`, which nothing else removes)."""
        for sub in subs:
            for f in (self.dir / sub).iterdir():
                m = WRITER_FILE.fullmatch(f.name)
                if m and (m.group(2) == "tmp" or int(m.group(1)) >= seq):
                    f.unlink()
        for f in self.dir.rglob("*.partial"):
            if _ZARR_PARTIAL.fullmatch(f.name):
                f.unlink()

    def put_shard(self, array: str, shard: int, two_d: bool, blob: bytes) -> None:
        write_shard(shard_file(self.dir / array, shard, two_d), blob)

    def sync_shard(self, array: str, shard: int, two_d: bool) -> None:
        fsync(shard_file(self.dir / array, shard, two_d))

    def sync(self, array: str, shards: list[int], two_d: bool) -> None:
        """fsync what the commit wrote into `array` (the shards' folders, its `zarr.json`, its folder)."""
        array_dir = self.dir / array
        sync_folders([shard_file(array_dir, s, two_d) for s in shards], array_dir)
        fsync(array_dir / "zarr.json")
        fsync(array_dir)

    def put_table(self, sub: str, name: str, table: pa.Table, commit_point: bool) -> None:
        """A temporary file, fsync, rename, fsync the folder: the rename of a samples file is the commit point."""
        path = self.dir / sub / name
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, compression="zstd")
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)


class ObjectPartFiles:
    """A part on an object store: every file one PUT (an object is seen whole or not at all); the samples table of a
    commit is created with `If-None-Match: *` after the lease is renewed; no fsync (a PUT is durable once
    acknowledged)."""

    def __init__(self, root: Location, part: str, lease_seconds: float = LEASE_SECONDS, take_over: bool = False,
                 conditional: bool = True):
        self.root, self.part, self.conditional = root, part, conditional
        self.dir = root.join("parts", part)
        self.lease = Lease(self.dir.join(LEASE_FILE), f"part {part} of {root}", lease_seconds, conditional,
                           take_over)
        self._obstore = self.dir.obstore() if self.dir.is_s3 else None

    def acquire(self) -> None:
        self.lease.acquire()

    def release(self) -> None:
        self.lease.release()

    def prepare(self, subs: tuple[str, ...]) -> None:
        """Nothing: an object store has no folders."""

    def _names(self, sub: str) -> list[str]:
        from .files import names_under

        return names_under(self.dir.join(sub))

    def last_commit(self, sub: str) -> dict[str, Any] | None:
        names = sorted(n for n in self._names(sub) if COMMIT_FILE.fullmatch(n))
        return read_commit(pa.BufferReader(self.dir.join(sub, names[-1]).read_bytes())) if names else None

    def clean(self, subs: tuple[str, ...], seq: int) -> None:
        for sub in subs:
            for name in self._names(sub):
                m = WRITER_FILE.fullmatch(name)
                if m and (m.group(2) == "tmp" or int(m.group(1)) >= seq):
                    self.dir.join(sub, name).remove()

    def put_shard(self, array: str, shard: int, two_d: bool, blob: bytes) -> None:
        """One PUT through obstore (Rust, without the GIL: the pool's PUTs overlap), where s3fs's botocore would
        sign and send under the GIL."""
        key = f"{array}/{shard_key(shard, two_d)}"
        if self._obstore is None:  # gs://, az://: through fsspec
            self.dir.join(key).write_bytes(blob)
            return
        import obstore

        try:
            obstore.put(self._obstore, key, blob)
        except Exception as e:
            raise (self.dir.error(e, "writing") or e) from None

    def sync_shard(self, array: str, shard: int, two_d: bool) -> None:
        """Nothing: each PUT was durable when acknowledged."""

    def sync(self, array: str, shards: list[int], two_d: bool) -> None:
        """Nothing: each PUT was durable when acknowledged."""

    def put_table(self, sub: str, name: str, table: pa.Table, commit_point: bool) -> None:
        obj, data = self.dir.join(sub, name), table_bytes(table)
        if not commit_point:
            obj.write_bytes(data)  # a rejects file: replaced whole by a re-run's, never read without its commit
            return
        self.lease.check()
        if not self.conditional:
            obj.write_bytes(data)
        elif not obj.write_bytes_if_absent(data):
            raise StoreError(f"commit {name} of part {self.part} of {self.root} exists already: another writer "
                             "committed it while this job held the part's lease; stop the other writer and run "
                             "`inspect-cache --verify`")


def part_files(root: Location, part: str, lease_seconds: float = LEASE_SECONDS, take_over: bool = False,
               unconditional: bool = False) -> LocalPartFiles | ObjectPartFiles:
    """The part's files where `root` lives. On an object store the server is probed for conditional writes first:
    without them two writers cannot be kept apart, refused unless `unconditional` (--allow-unconditional-writes)."""
    if root.is_local:
        return LocalPartFiles(root, part)
    conditional = root.supports_conditional_writes()
    if not conditional and not unconditional:
        raise StoreError(f"{root}: the server at {root.endpoint()} ignores conditional writes (If-None-Match, "
                         "If-Match), which keep two writers off one part; pass --allow-unconditional-writes if you "
                         "make sure yourself that one job writes each part")
    return ObjectPartFiles(root, part, lease_seconds, take_over, conditional)


def save_tokenizer(tokenizer: Any, dest: Location) -> None:
    """`tokenizer.save_pretrained` into `dest`: a local folder, or through a temporary one, file by file, to an object
    store."""
    if dest.is_local:
        tokenizer.save_pretrained(dest.path)
        return
    with tempfile.TemporaryDirectory(prefix="genrecal-") as d:
        tokenizer.save_pretrained(d)
        for path in sorted(Path(d).rglob("*")):
            if path.is_file():
                dest.join(str(path.relative_to(d))).write_bytes(path.read_bytes())
