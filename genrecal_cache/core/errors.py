"""Errors a user can cause, each with the fix in its message.

Domain errors also subclass the builtin a caller would catch (zarr-python's habit).
"""

from __future__ import annotations

import re


class GenrecalError(Exception):
    """Base of every error GenRecal raises on purpose; a console command exits with its `exit_status`."""

    exit_status = 2  # a user error: the message says the fix


class ConfigError(GenrecalError, ValueError):
    """A flag or config value is wrong; the message names the flag."""


class DatasetError(GenrecalError, ValueError):
    """The manifest cannot be read at all (a bad row becomes a reject instead)."""


class RejectError(GenrecalError, ValueError):
    """One sample cannot be used; `reason` is recorded in the rejects table."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StoreError(GenrecalError, RuntimeError):
    """The teacher store is missing, damaged or incompatible with the request."""


class TeacherFailure(GenrecalError, RuntimeError):
    """The teacher's engine or device failed (not the data): the job stopped after committing what was done, and the
    same command resumes. Exit status 3, not 2, so a launcher that re-runs crashed jobs (Ray) re-runs it."""

    exit_status = 3


class TrainingError(GenrecalError, RuntimeError):
    """A stage cannot go on without writing nonsense (a non-finite loss, nothing to train on): it stops before the
    optimizer step, and the message names the step, the samples and what to do."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No teacher store at the given path."""


class StoreServerError(StoreError):
    """An object store's server or credentials failed (no server, access denied, no bucket), not the store's
    content: readers pass it on rather than report damage."""


class IncompatibleStoreError(StoreError):
    """An existing store was written by another teacher or with other settings."""


def reason_kind(reason: str) -> str:
    """A reject reason with its numbers and quoted values folded, to count reasons by kind: "row 12 has 3 images"
    and "row 7 has 2 images" are one kind; digits after a letter ("base64", "utf-8") are part of a word."""
    kind = reason.split(":")[0] if ":" in reason and not reason.startswith("processor") else reason
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", kind)
    kind = re.sub(r"\b\d+x\d+\b", "NxN", kind)  # sizes: 640x480
    return re.sub(r"(?<![A-Za-z_\d.])(?<![A-Za-z]-)\d+(\.\d+)?", "N", kind)
