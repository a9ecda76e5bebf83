"""One writer per part on an object store, where there is no `flock`: a lease object created with a conditional PUT
(`If-None-Match: *`), renewed with `If-Match` on its ETag while the job runs, and taken over once it has expired.

The lease (`parts/<part>/lease.json`) records its holder (host, boot id, pid, a random owner id) and when it
expires; a second writer is refused while it is unexpired, naming the holder and how long to wait. A lease whose
holder ran on this machine and is gone (its pid no longer lives) is taken over at once; one from another machine
after its expiry, or at once with `--take-over-lease`. Expiry compares the holder's clock with the taker's: they
must agree within a few seconds (NTP), far less than the lease time.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from genrecal_cache.core.errors import StoreError
from genrecal_cache.core.locations import Location
from genrecal_cache.core.process import alive

LEASE_FILE = "lease.json"
LEASE_SECONDS = 120.0  # default lease time (`--lease-seconds`); renewed every quarter of it


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class LeaseHeldError(StoreError):
    """Another writer holds the part's lease."""


class Lease:
    """The lease of one part at `loc` (its `lease.json`): `acquire()`, then `check()` before each commit point,
    `release()` at the end; a daemon thread renews it every `seconds / 4`. `conditional=False` (a server without
    conditional writes, where the user opted in) writes it with plain PUTs: it still names the holder but cannot
    keep two writers apart."""

    def __init__(self, loc: Location, what: str, seconds: float = LEASE_SECONDS, conditional: bool = True,
                 take_over: bool = False):
        self.loc, self.what, self.seconds = loc, what, float(seconds)
        self.conditional, self.take_over = conditional, take_over
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: StoreError | None = None  # set by the renewal thread when the lease was taken over
        self._stop = threading.Event()
        self._lock = threading.Lock()  # renewals from the thread and from check() one at a time
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "boot_id": _boot_id(),
                           "pid": os.getpid(), "renewed": round(now, 3), "expires": round(now + self.seconds, 3),
                           "seconds": self.seconds}, sort_keys=True).encode()

    def acquire(self) -> Lease:
        """Take the lease or raise `LeaseHeldError` naming its holder and how long to wait."""
        if not self.conditional:
            self.loc.write_bytes(self._record())
            self.etag = ""
        elif self.loc.write_bytes_if_absent(self._record()):
            self.etag = self.loc.etag()
        else:
            self._take_over()
        self._thread = threading.Thread(target=self._renew_loop, name="genrecal-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over(self) -> None:
        """The lease exists: take it over if its holder is gone, else refuse. Its ETag is read before its content, so
        a renewal in between makes the conditional replace fail rather than take a live lease: then look again."""
        for _ in range(5):
            try:
                etag = self.loc.etag()
                held = json.loads(self.loc.read_bytes())
            except FileNotFoundError:  # released meanwhile
                if self.loc.write_bytes_if_absent(self._record()):
                    self.etag = self.loc.etag()
                    return
                continue
            except ValueError:
                held = {}
            left = float(held.get("expires", 0)) - time.time()
            dead = (held.get("host") == socket.gethostname() and held.get("boot_id") == _boot_id()
                    and isinstance(held.get("pid"), int) and not alive(held["pid"]))
            if left > 0 and not dead and not self.take_over:
                raise LeaseHeldError(
                    f"another cache-teacher is writing {self.what} (pid {held.get('pid')} on {held.get('host')}; "
                    f"its lease {self.loc} runs {left:.0f} s more and is renewed while it lives): wait for it, or "
                    "give this job another --shard. If that job is dead, re-run once the lease expires, or now with "
                    "--take-over-lease")
            new = self.loc.replace_if_match(self._record(), etag)
            if new is not None:
                self.etag = new
                return
        raise LeaseHeldError(f"{self.what}: its lease {self.loc} keeps changing under this job: another writer "
                             "is taking it; only one writer may hold it, stop one of them")

    def renew(self) -> None:
        """Extend the lease; a lease taken over by another writer is an error (kept in `lost`)."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if not self.conditional:
                self.loc.write_bytes(self._record())
                return
            new = self.loc.replace_if_match(self._record(), self.etag or "")
            if new is None:
                self.lost = StoreError(
                    f"{self.what}: this job lost its lease {self.loc} to another writer (it was not renewed in time, "
                    "or --take-over-lease was given elsewhere); it stops before its next commit. Make sure one job "
                    "writes each part, and re-run")
                raise self.lost
            self.etag = new

    def check(self) -> None:
        """Before a commit point: renewed now, so the commit is made by the lease's holder."""
        self.renew()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a server hiccup: tried again at the next interval and at check()
                if self.lost is not None:  # taken over: check() raises it before the next commit
                    return

    def release(self) -> None:
        """Stop renewing and delete the lease (left to expire where the server cannot be reached)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is not None and self.lost is None:
            try:
                self.loc.remove()
            except Exception:  # noqa: BLE001 - it expires on its own; the job's own error is the news
                pass
        self.etag = None


def lease_state(loc: Location) -> dict[str, Any] | None:
    """The lease recorded at `loc` (None when none): for `inspect-cache --progress` and the tests."""
    try:
        return json.loads(loc.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
