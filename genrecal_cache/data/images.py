"""A row's image sources → `ImageRef`s: files under the image root (links followed only where they stay in it,
or in the Hugging Face cache's blobs), bytes, base64, data URIs, and http(s) URLs fetched within a total time
and a size limit, following only http(s) redirects. Rows are parsed in `rows.py`."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import http.client
import io
import os
import posixpath
import re
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from genrecal_cache.core.errors import RejectError
from genrecal_cache.core.locations import Location

TIMEOUT_S = 60.0  # --remote-image-timeout: one image's whole fetch
MAX_BYTES = 64 << 20  # --remote-image-max-bytes: 400 MB bodies exist; no image needs them
# No class overlaps the next, so a failed match gives up in linear time (whitespace in both the body and the
# tail made a run of spaces quadratic: hours for 1 MB). Whitespace is taken out before matching.
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


@dataclass
class ImageRef:
    """One image of a sample: its encoded bytes, where it came from, and a content digest."""

    data: bytes
    path: str | None = None
    digest: str = ""
    _rgb: Image.Image | None = field(default=None, repr=False, compare=False)  # decoded once, not pickled

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(self.data).hexdigest()

    def load(self) -> Image.Image:
        """The image as RGB, decoded on first use (parse_row decodes it to check it, and keeps it)."""
        if self._rgb is None:
            self._rgb = Image.open(io.BytesIO(self.data)).convert("RGB")
        return self._rgb

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rgb": None}  # bytes travel between processes, pixels are decoded again


def load_image(src: Any, root: Path | Location, i: int, allow_outside_root: bool = False,
               remote: tuple[float, int] | None = None) -> ImageRef:
    """An image from a path (relative to the image root, absolute, or file://), raw bytes, a {bytes, path}
    struct (datasets' Image), base64, a data URI, or (with `remote`: its time and size limits) an http(s) URL."""
    path: str | None = None
    if isinstance(src, dict):  # Parquet/HF datasets style {"bytes": ..., "path": ...}
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif isinstance(src, str) and src.startswith("data:"):
        data = _b64(src.split(",", 1)[-1], i)
    elif isinstance(src, str) and src.startswith(("http://", "https://")):
        if remote is None:
            raise RejectError(f"image {i} is a remote URL ({src[:100]}); pass --allow-remote-images to fetch it")
        data = _fetch(src, i, *remote)
    elif isinstance(src, str) and src and isinstance(root, Location):  # images on an object store
        if _looks_base64(src):  # no object name: "." is not base64
            data = _b64(src, i)
        else:
            data, path = _remote_object(src, root, i, allow_outside_root)
    elif isinstance(src, str) and src:
        name = src.removeprefix("file://")
        p = Path(name) if Path(name).is_absolute() else root / name
        if not allow_outside_root and _is_file(p) and not _inside(p, root):
            raise RejectError(f"image {i} ({name}) is outside the dataset root {root}; pass --allow-outside-root "
                              "if the manifest is trusted (or --image-root the folder that holds the images)")
        if _is_file(p):
            try:
                data, path = p.read_bytes(), str(p.resolve())
            except OSError as e:
                raise RejectError(f"image {i} cannot be read: {p} ({e.strerror or e})") from None
        elif _looks_base64(src):
            data = _b64(src, i)
        else:
            raise RejectError(f"image {i} is not a file under the image root ({p} does not exist; set --image-root "
                              f"to the folder the paths are relative to), and not base64: {src[:80]!r}")
    else:
        raise RejectError(f"image {i} has an unsupported source of type {type(src).__name__}")
    ref = ImageRef(data, path)
    try:
        ref.load()
    except Exception as e:  # PIL raises many types for bad bytes
        raise RejectError(f"cannot decode image {i} ({type(e).__name__}: {str(e)[:120]})") from None
    return ref


def _looks_base64(src: str) -> bool:
    """Whether a string that names no file is an image's base64 (long enough, base64's alphabet only)."""
    return len(src) >= 64 and _BASE64.fullmatch("".join(src.split())) is not None


def _remote_object(src: str, root: Location, i: int, allow_outside_root: bool) -> tuple[bytes, str]:
    """An image named relative to an image root on an object store (or by its own URL): its bytes and URL. A name
    that leaves the root (`..`, another bucket or prefix) is refused unless `allow_outside_root`."""
    if "://" in src:
        where, inside = Location.of(src, root.storage_options), src.startswith(root.url.rstrip("/") + "/")
    else:
        name = posixpath.normpath(src)
        where, inside = root.join(name), not (name == ".." or name.startswith(("../", "/")))
    if not inside and not allow_outside_root:
        raise RejectError(f"image {i} ({src}) is outside the image root {root}; pass --allow-outside-root if the "
                          "manifest is trusted (or --image-root the prefix that holds the images)")
    try:
        return where.read_bytes(), where.url
    except (FileNotFoundError, IsADirectoryError):
        raise RejectError(f"image {i} is not an object under the image root ({where} does not exist; set "
                          "--image-root to the prefix the paths are relative to)") from None


def _inside(p: Path, root: Path) -> bool:
    """Whether image file `p` lies under the image root: its target (links followed) under the root's target,
    or, under a Hugging Face cache snapshot (`<repo>/snapshots/<rev>/...`, where every file is a link to
    `<repo>/blobs/<sha>`), reached by a path inside the root and landing in that repository's blobs."""
    target, real_root = p.resolve(), root.resolve()
    if target.is_relative_to(real_root):
        return True
    if not Path(os.path.abspath(p)).is_relative_to(os.path.abspath(root)):
        return False  # `..` or an absolute path elsewhere
    for base in (Path(os.path.abspath(root)), real_root):
        for snapshot in (base, *base.parents):
            if snapshot.parent.name == "snapshots" and (snapshot.parent.parent / "blobs").is_dir():
                return target.is_relative_to((snapshot.parent.parent / "blobs").resolve())
    return False


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # e.g. a name too long to be a path
        return False


def _b64(text: str, i: int) -> bytes:
    text = "".join(text.split())  # MIME-wrapped base64 has newlines
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RejectError(f"image {i} is not a file under the image root, and not base64 (it does not decode): "
                          f"{text[:80]!r}") from None


# --- remote images ------------------------------------------------------------------------------------------------

class _Deadline:
    """Ends a fetch at a wall-clock time: its sockets are shut down then, which wakes a read blocked on a server
    that sends a byte now and then (a per-read timeout never fires on such a server)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _Watched:
    """A connection whose sockets the deadline can shut down: the TCP socket as soon as it is connected (a TLS
    handshake may drip too), then the TLS socket wrapped around it. `_create_connection` is http.client's own
    hook for making the socket (its tests replace it the same way)."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        create = self._create_connection

        def create_watched(*a: Any, **kw: Any) -> socket.socket:
            sock = create(*a, **kw)
            deadline.watch(sock)
            return sock

        self._create_connection = create_watched

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_HTTPConnection, deadline=self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self._deadline), req,
                            context=self._context)


class _Redirected(Exception):
    """A redirect to a scheme other than http(s) (urllib would follow ftp://)."""


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            fp.close()
            raise _Redirected(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, i: int, timeout: float, max_bytes: int) -> bytes:
    """The body at `url`, or a reject naming the limit it broke: more than `max_bytes`, more than `timeout`
    seconds in all (connecting, redirects and the body), or a redirect to another scheme than http(s)."""
    deadline = _Deadline(timeout)
    opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline), _HTTPOnlyRedirects)
    too_big = (f"image {i} at {url[:100]} is larger than --remote-image-max-bytes {max_bytes} (raise it for "
               "larger images)")
    try:
        with opener.open(url, timeout=timeout) as r:
            declared = r.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise RejectError(too_big)
            chunks, size = [], 0
            while chunk := r.read1(1 << 16):  # what has arrived: the size is counted as it comes
                size += len(chunk)
                if size > max_bytes:
                    raise RejectError(too_big)
                chunks.append(chunk)
            if deadline.expired:  # the shut-down socket reads as the end of the body
                raise TimeoutError
            return b"".join(chunks)
    except RejectError:
        raise
    except _Redirected as e:
        raise RejectError(f"image {i}: {url[:100]} redirects to {str(e)[:100]}; only http(s) redirects are "
                          "followed") from None
    except Exception as e:  # URLError, timeouts, HTTP errors, a connection cut at the deadline
        if deadline.expired:
            raise RejectError(f"image {i} could not be fetched from {url[:100]} within --remote-image-timeout "
                              f"{timeout:g} s (raise it for slow servers)") from None
        raise RejectError(f"image {i} could not be fetched from {url[:100]} ({type(e).__name__}: "
                          f"{str(e)[:120]})") from None
    finally:
        deadline.cancel()
