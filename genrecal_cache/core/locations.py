"""Where a store, manifest or image lives: a local path (as before) or any fsspec URL (`s3://`, `gs://`, `az://`,
`file://`), as one `Location` with the operations the store needs, conditional writes included; errors of the
server or the credentials become one-line `StoreError`s naming the URL (docs/store.md, "Object stores")."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from genrecal_cache.core.durable import fsync
from genrecal_cache.core.errors import ConfigError, StoreError, StoreServerError
from genrecal_cache.core.object_stores import REFUSED, missing_bucket, obstore_s3, one_line, reply_codes, server_error

FLAG = "--storage-options"
STORAGE_OPTIONS_HELP = ("Options of the store's fsspec filesystem when it is a URL (s3fs: key, secret, token, profile, "
                        "anon, client_kwargs.endpoint_url, ...), as JSON or YAML text or the path of a file holding "
                        "them; AWS_* variables and profiles are read as usual without it.")
LOCAL_PROTOCOLS = ("file", "local")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options`: JSON or YAML text of a mapping, or the path of a file holding one."""
    if text is None or not str(text).strip():
        return {}
    text, source = str(text).strip(), "the text"
    if not text.startswith(("{", "[")) and Path(text).expanduser().is_file():
        source = str(Path(text).expanduser())
        text = Path(text).expanduser().read_text()
    try:
        value = yaml.safe_load(text)  # YAML 1.2 reads JSON too
    except yaml.YAMLError as e:
        raise ConfigError(f"{FLAG}: {source} is not JSON or YAML ({str(e).splitlines()[0]}); give a mapping such "
                          'as \'{"key": "...", "secret": "..."}\' or the path of a .json/.yaml file') from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{FLAG}: {source} is neither a mapping nor a file ({text[:60]!r}); give a mapping such as"
                          ' \'{"client_kwargs": {"endpoint_url": "http://host:8333"}}\' or the path of a .json/.yaml'
                          " file holding one")
    return value


SECRET_KEYS = {"key", "secret", "token", "password", "session_token", "account_key", "connection_string",
               "sas_token", "client_secret", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}


def redact_storage_options(text: str | None) -> str | None:
    """--storage-options as recorded in a run's config.yaml and checkpoints: credentials masked (`***`), the rest
    (endpoint, region, profile) kept; a file's path is kept as given."""
    if text is None or not str(text).strip() or Path(str(text).strip()).expanduser().is_file():
        return text

    def mask(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: "***" if str(k).lower() in SECRET_KEYS else mask(x) for k, x in v.items()}
        return [mask(x) for x in v] if isinstance(v, list) else v

    try:
        return json.dumps(mask(parse_storage_options(text)))
    except ConfigError:
        return "***"


def store_path(text: str | os.PathLike) -> Path | str:
    """A store named on the command line: a local folder as a Path (`file://` dropped), an fsspec URL as given
    (a Path would fold its `//`)."""
    text = os.fspath(text)
    if "://" in text and not text.startswith("file://"):
        return text.rstrip("/")
    return Path(text.removeprefix("file://"))


class Location:
    """A local path or a remote URL. `Location.of(x)` for a str, Path, `file://` or any fsspec URL."""

    def __init__(self, url: str, fs: Any | None, path: str, protocol: str, storage_options: dict[str, Any]):
        self.url, self._fs, self.path, self.protocol = url, fs, path, protocol
        self.storage_options = storage_options
        self._pid = os.getpid()

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (None for a local path); in a forked process (render workers) a new one: fsspec's
        async filesystems are not fork-safe."""
        if self._fs is not None and self._pid != os.getpid():
            import fsspec

            self._fs, self._pid = fsspec.filesystem(self.protocol, **self._fs.storage_options), os.getpid()
        return self._fs

    @classmethod
    def of(cls, where: str | os.PathLike | Location, storage_options: dict[str, Any] | None = None) -> Location:
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        protocol, _, rest = text.partition("://") if "://" in text else ("file", "", text)
        if protocol in LOCAL_PROTOCOLS:
            return cls(rest, None, rest, "file", {})
        import fsspec

        # Listings are not cached: other writers change a store while it is open, and a stale listing hides commits.
        opts = {"use_listings_cache": False, **(storage_options or {})}
        try:
            fs, path = fsspec.core.url_to_fs(text, **opts)
        except ImportError as e:
            raise ConfigError(f"{text}: {protocol}:// needs a package that is not installed ({e})") from None
        except ValueError as e:
            raise ConfigError(f"{text}: unknown URL scheme {protocol}:// ({e}); use a local path or an fsspec URL "
                              "such as s3://bucket/prefix") from None
        except TypeError as e:
            raise ConfigError(f"{FLAG}: not an option of {protocol}:// ({e})") from None
        return cls(text.rstrip("/"), fs, path.rstrip("/"), fs.protocol[0] if isinstance(fs.protocol, tuple)
                   else fs.protocol, opts)

    @property
    def is_local(self) -> bool:
        return self.fs is None

    @property
    def is_s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.protocol, self.path) == (other.protocol, other.path)

    def __hash__(self) -> int:
        return hash((self.protocol, self.path))

    def join(self, *parts: str) -> Location:
        if self.is_local:
            p = str(Path(self.path, *parts))
            return Location(p, None, p, "file", {})
        tail = "/".join(s.strip("/") for s in parts)
        return Location(f"{self.url}/{tail}", self.fs, f"{self.path}/{tail}", self.protocol, self.storage_options)

    # --- errors ---------------------------------------------------------------------------------------------------

    def endpoint(self) -> str:
        """The server this location talks to, for messages (S3: the endpoint botocore resolved)."""
        if self.is_s3:
            with contextlib.suppress(Exception):
                return str(self.fs.s3.meta.endpoint_url)
        return f"{self.protocol}://"

    def error(self, exc: BaseException, doing: str) -> StoreError | None:
        """The one-line StoreError an exception from the server means, or None (a missing object, a bug)."""
        return server_error(self.url, exc, doing, protocol="s3" if self.is_s3 else self.protocol,
                            bucket=self.path.split("/", 1)[0], endpoint=self.endpoint())

    @contextlib.contextmanager
    def _remote(self, doing: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            err = self.error(e, doing)
            if err is None:
                raise
            raise err from None

    # --- reading and writing ----------------------------------------------------------------------------------

    def exists(self) -> bool:
        if self.is_local:
            return Path(self.path).exists()
        with self._remote("looking for it"):
            return bool(self.fs.exists(self.path))

    def read_bytes(self) -> bytes:
        """The whole object; FileNotFoundError where there is none."""
        if self.is_local:
            return Path(self.path).read_bytes()
        with self._remote("reading"):
            return self.fs.cat_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Create or overwrite, whole (locally through a renamed temporary file, fsynced)."""
        if self.is_local:
            tmp = self._local_tmp(data)
            os.replace(tmp, self.path)
            fsync(Path(self.path).parent)
            return
        with self._remote("writing"):
            self.fs.pipe_file(self.path, data)

    def remove(self) -> None:
        if self.is_local:
            Path(self.path).unlink(missing_ok=True)
            return
        with self._remote("deleting"), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)

    def listdir(self) -> list[str]:
        """The names directly under this location, sorted; FileNotFoundError where there is nothing."""
        if self.is_local:
            return sorted(os.listdir(self.path))
        with self._remote("listing"):
            found = self.fs.ls(self.path, detail=False, refresh=True)
        names = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in found if str(p).rstrip("/") != self.path}
        return sorted(names)

    def _local_tmp(self, data: bytes) -> str:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    # --- conditional writes (the later commit protocol's leases) -------------------------------------------------

    def write_bytes_if_absent(self, data: bytes) -> bool:
        """Create the object only if there is none: True if this call created it, False if one was there.
        S3: PUT with If-None-Match: *. Locally: a complete temporary file hard-linked into place (link refuses an
        existing name, like O_EXCL, and the file is never seen half-written)."""
        if self.is_local:
            tmp = self._local_tmp(data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            fsync(Path(self.path).parent)
            return True
        self._need_s3("a conditional create")
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            with self._remote("creating it"):
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except OSError as e:
            if reply_codes(e)[1] & REFUSED:
                return False
            raise
        return True

    def etag(self) -> str:
        """The object's version tag for `replace_if_match` (S3's ETag; locally a digest of the content)."""
        if self.is_local:
            return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        self._need_s3("an ETag")
        with self._remote("reading its ETag"):
            return str(self.fs.info(self.path)["ETag"])

    def replace_if_match(self, data: bytes, etag: str) -> str | None:
        """Overwrite the object only if it still has `etag`: its new tag, or None if it changed or is gone.
        S3: PUT with If-Match. Locally: under flock of the current file, compared, then renamed over."""
        if self.is_local:
            return self._local_replace_if_match(data, etag)
        self._need_s3("a conditional replace")
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            with self._remote("replacing it"):
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
        except (OSError, FileNotFoundError) as e:
            if reply_codes(e)[1] & (REFUSED | {"NoSuchKey", "404"}):
                return None
            raise
        return str(out["ETag"])

    def _local_replace_if_match(self, data: bytes, etag: str) -> str | None:
        while True:
            try:
                f = open(self.path, "rb")
            except FileNotFoundError:
                return None
            with f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX)
                except OSError as e:
                    if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                        raise
                    raise StoreError(f"{self.url}: this file system has no file locks (flock); use a local disk, "
                                     "NFS v4, or Lustre mounted with -o flock") from None
                try:  # a replace that ran while we waited renamed a new file over the one we hold: start again
                    if os.fstat(f.fileno()).st_ino != os.stat(self.path).st_ino:
                        continue
                except FileNotFoundError:
                    return None
                if hashlib.sha256(f.read()).hexdigest() != etag:
                    return None
                tmp = self._local_tmp(data)
                os.replace(tmp, self.path)
                fsync(Path(self.path).parent)
                return hashlib.sha256(data).hexdigest()

    def _need_s3(self, what: str) -> None:
        if not self.is_s3:
            raise StoreError(f"{self.url}: {what} is implemented for local paths and s3:// only, not "
                             f"{self.protocol}:// yet")

    def supports_conditional_writes(self) -> bool:
        """Probe: a probe object created twice with If-None-Match (the second must be refused) and replaced with a
        wrong If-Match (refused), then deleted. False where the server ignores the conditions."""
        if self.is_local:
            return True
        if not self.is_s3:
            return False
        self.check_reachable()  # so that a server down or a wrong key is named as such, with this URL
        probe = self.join(f".genrecal-probe-{uuid.uuid4().hex}")
        try:
            first = probe.write_bytes_if_absent(b"first")
            second = probe.write_bytes_if_absent(b"second")
            wrong = probe.replace_if_match(b"third", '"0123456789abcdef0123456789abcdef"')
            return first and not second and wrong is None and probe.read_bytes() == b"first"
        except OSError:  # a server that rejects the headers outright (501 NotImplemented, 400)
            return False
        finally:
            with contextlib.suppress(Exception):  # a probe left behind is harmless; the error above is the news
                probe.remove()

    # --- the server, zarr ------------------------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """A StoreError, one line naming the URL and what to check, unless the server answers, the credentials
        are accepted and the bucket exists (locally: nothing to check)."""
        if self.is_local:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            if self.is_s3:
                self.fs.call_s3("head_bucket", Bucket=bucket)
            elif not self.fs.exists(bucket):
                raise FileNotFoundError(f"bucket does not exist: {bucket}")
        except Exception as e:
            if isinstance(e, FileNotFoundError) or reply_codes(e)[1] & {"404", "NoSuchBucket"}:
                raise missing_bucket(self.url, bucket, self.endpoint()) from None
            raise (self.error(e, "checking the bucket") or StoreServerError(
                f"{self.url}: the server at {self.endpoint()} failed ({type(e).__name__}: {one_line(e)}); check "
                f"the URL, the endpoint and {FLAG}")) from None

    def zarr_store(self, read_only: bool = False):
        """A zarr v3 store rooted here: LocalStore for a local path; for s3://, zarr's ObjectStore over obstore
        (measured faster than FsspecStore, at less CPU: docs/store.md, "Object stores"); FsspecStore otherwise."""
        from zarr.storage import FsspecStore, LocalStore, ObjectStore

        if self.is_local:
            return LocalStore(self.path, read_only=read_only)
        if self.is_s3:
            return ObjectStore(self.obstore(), read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)

    def obstore(self):
        """obstore's S3Store rooted here (s3:// only), with the endpoint and region botocore resolved for s3fs
        (AWS_ENDPOINT_URL, profiles, ...) and the same credentials: Rust's client, which releases the GIL, for
        the writer's shard PUTs and zarr's array I/O."""
        self._need_s3("obstore")
        meta = self.fs.s3.meta
        bucket, _, prefix = self.path.partition("/")
        return obstore_s3(bucket, prefix, str(meta.endpoint_url), meta.region_name, self.storage_options)
