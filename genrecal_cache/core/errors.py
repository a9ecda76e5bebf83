"""Errors a user can cause, each with the fix in its message.

Domain errors also subclass the builtin a caller would catch (zarr-python's habit).
"""

from __future__ import annotations

import re


class GenrecalError(Exception):
    """Base of every error GenRecal raises on purpose."""


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


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No teacher store at the given path."""


class IncompatibleStoreError(StoreError):
    """An existing store was written by another teacher or with other settings."""


def reason_kind(reason: str) -> str:
    """A reject reason with its numbers, paths and quoted values folded, to count reasons by kind."""
    kind = reason.split(":")[0] if ":" in reason and not reason.startswith("processor") else reason
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", kind)
    return re.sub(r"\d+", "N", kind)
