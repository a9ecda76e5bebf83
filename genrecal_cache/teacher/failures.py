"""Telling a teacher that failed (its engine died, its device errs) from a sample it cannot take: `Guard` runs the
teacher over a batch, bisects a failing batch, and judges a sample that fails alone by a sample that ran before.
The cache job stops on `TeacherDown` and records a `Failed` sample as a reject (docs/DESIGN.md, "Stopping on bad data").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from genrecal_cache.core.errors import TeacherFailure
from genrecal_cache.core.faults import fault_point

DEVICE, OUT_OF_MEMORY = "device", "out of memory"
# vLLM's engine errors, found by class name so that the transformers backend never imports vLLM: EngineDeadError
# (the engine core died) and its base VLLMServerError (the engine's fault; VLLMClientError is the request's).
_ENGINE_ERRORS = {"EngineDeadError", "VLLMServerError", "AcceleratorError"}  # AcceleratorError: torch's CUDA errors
_DEVICE_WORDS = ("CUDA", "CUBLAS", "cuDNN", "CUDNN", "NCCL", "device-side assert", "HIP error")  # case as written


def _chain(e: BaseException) -> list[BaseException]:
    """The error and what caused it (vLLM re-raises an engine death from inside its own handlers)."""
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def classify(e: BaseException) -> str | None:
    """`OUT_OF_MEMORY` (torch's OutOfMemoryError, or a message saying "out of memory"), `DEVICE` (an engine death
    or a CUDA error: nothing after it can be trusted) or None: not known to be either."""
    chain = _chain(e)
    for x in chain:
        if "OutOfMemoryError" in {c.__name__ for c in type(x).__mro__} or "out of memory" in str(x).lower():
            return OUT_OF_MEMORY
    for x in chain:
        if {c.__name__ for c in type(x).__mro__} & _ENGINE_ERRORS:
            return DEVICE
        if isinstance(x, RuntimeError) and any(w in str(x) for w in _DEVICE_WORDS):
            return DEVICE
    return None


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:200]}"


class TeacherDown(Exception):
    """The teacher failed, not the sample: `why` says how it was told, `cause` is the error."""

    def __init__(self, why: str, cause: BaseException):
        super().__init__(f"{why} ({describe(cause)})")
        self.why, self.cause = why, cause

    def failure(self, rows_end: int, samples: int) -> TeacherFailure:
        """The job's error once the rows below `rows_end` are committed (`samples` of them in this run)."""
        return TeacherFailure(
            f"stopped: the teacher failed, not the data: {self}. Every row before {rows_end} is committed "
            f"({samples} samples in this run) and no reject was recorded for the rows it was running. Re-run the "
            "same command to continue (on a GPU, check that it is healthy first).")


@dataclass
class Failed:
    """A sample the teacher raised on alone, while the teacher itself works: the job's reject."""

    error: BaseException


class Guard:
    """Runs `call(items) -> one result per item` for the job, keeping the last item that ran (the canary).

    - An engine or device error (`classify` says DEVICE) raises `TeacherDown` at once.
    - Any other error (out of memory included) on a batch of several: each item is run alone.
    - An item that fails alone is run against the canary, a sample that ran in this job: if the canary fails now
      too, the teacher is down (`TeacherDown`); if it runs, the item is `Failed` (its reject). Without a canary the
      other items of its batch decide: if one of them runs, the item is `Failed`; if none of two or more does,
      the teacher is down. A lone item with nothing to compare is `Failed`: its reject is retryable.
    """

    def __init__(self, call: Callable[[Sequence[Any]], list[Any]], name: str = "forward"):
        self._call, self.name, self.calls, self.canary = call, name, 0, None

    def call(self, items: Sequence[Any]) -> list[Any]:
        fault_point(f"teacher-{self.name}:{self.calls}")  # the crash tests' failing device
        self.calls += 1
        return self._call(items)

    def run(self, items: Sequence[Any]) -> list[Any]:
        try:
            return self._ran(items)
        except Exception as e:  # sorted out below: the teacher's fault or the sample's
            self._check_device(e)
            _free()
            if len(items) == 1:
                return [self._judge(items[0], e)]
            out: list[Any] = []
            for item in items:
                try:
                    out += self._ran([item])
                except Exception as err:
                    self._check_device(err)
                    _free()
                    # Without a canary yet, judged by the rest of the batch: `Failed` if any of it runs.
                    out.append(Failed(err) if self.canary is None else self._judge(item, err))
            if self.canary is None:  # none ran, nor anything before
                raise TeacherDown(f"none of the {len(items)} samples of a batch runs, even alone", e) from e
            return out

    def _ran(self, items: Sequence[Any]) -> list[Any]:
        out = self.call(items)
        self.canary = items[-1]
        return out

    def _check_device(self, e: Exception) -> None:
        if classify(e) == DEVICE:
            raise TeacherDown("its engine or device failed", e) from e

    def _judge(self, item: Any, e: Exception) -> Failed:
        """`item` failed alone: the teacher's fault when the canary, which ran before, fails now too."""
        if self.canary is not None and self.canary is not item:
            try:
                self.call([self.canary])
            except Exception as err:
                self._check_device(err)
                raise TeacherDown(f"a sample that ran before fails now too ({describe(err)})", e) from e
        return Failed(e)


def _free() -> None:
    """Give back cached device memory before running smaller (after an out of memory)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
