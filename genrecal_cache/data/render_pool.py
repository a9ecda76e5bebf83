"""Parse and render manifest rows in worker processes (`--render-workers`), overlapped with the teacher engine.

Results come back in manifest order through a bounded window of rows in flight; with no workers the same
function runs in the job's own process. A worker that dies stops the job with its row named.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import torch

from genrecal_cache.core.errors import GenrecalError, RejectError
from genrecal_cache.core.faults import fault_point
from genrecal_cache.core.process import die_with_parent

from .render import Rendered, Renderer
from .rows import Row, Sample, parse_row

ROWS_IN_FLIGHT_PER_WORKER = 16  # at least this many rows ahead per worker
MAX_ROWS_IN_FLIGHT = 4096  # and never more, whatever the samples' sizes


@dataclass
class Task:
    """One manifest row to prepare: its renamed id (`--duplicate-ids suffix`) or the first occurrence of the id
    it repeats (`reject`)."""

    row: Row
    sample_id: str | None = None
    duplicate_of: tuple[str, int] | None = None


@dataclass
class Preparer:
    """What turns a row into a rendered sample: the parse options and the renderer. `prompt`: render only what
    the teacher answers (`--answers generate`), else the whole conversation."""

    renderer: Renderer
    parse_options: dict[str, Any] = field(default_factory=dict)
    prompt: bool = False

    def __call__(self, task: Task) -> tuple[Sample, Rendered] | RejectError:
        fault_point(f"render-row-{task.row.index}")
        try:
            if task.duplicate_of is not None:
                sid, first = task.duplicate_of
                raise RejectError(f"duplicate sample id {sid!r} (first at row {first})")
            sample = parse_row(task.row, sample_id=task.sample_id, **self.parse_options)
            return sample, (self.renderer.render_prompt(sample) if self.prompt else self.renderer.render(sample))
        except RejectError as e:
            return e


class RenderWorkerError(GenrecalError, RuntimeError):
    """A render worker process died (killed, out of memory); the job stops after committing what it has."""


def default_workers() -> int:
    """min(8, CPUs - 1): the rest of the machine renders while one core runs the job (and the engine's loop)."""
    return max(0, min(8, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                          os.cpu_count() or 1) - 1))


_WORKER: Preparer | None = None


def _init_worker(preparer: Preparer) -> None:
    global _WORKER
    _WORKER = preparer
    # One thread, as torch's DataLoader workers: a worker forked after the job ran torch ops on several threads
    # inherits an OpenMP pool whose threads it lacks, and its first parallel op (a large tensor's copy into
    # shared memory, to send a rendered sample back) would wait on them forever.
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the job's to handle: it stops the pool
    die_with_parent()  # a killed job would otherwise leave its workers waiting forever


def _prepare_in_worker(task: Task) -> tuple[Sample, Rendered] | RejectError:
    assert _WORKER is not None
    return _WORKER(task)


def _pool_processes(executor: ProcessPoolExecutor | None) -> dict[int, Any]:
    """A ProcessPoolExecutor's worker processes by pid ({} when unknown). concurrent.futures has no public way to
    reach them (to read how a dead one ended): this reads its private `_processes` (CPython 3.8+), and another
    Python may need this updated."""
    return getattr(executor, "_processes", None) or {}


class RenderPool:
    """`prepare(tasks)` yields (task, rendered sample or RejectError) in order; `close()` stops the workers.

    Rows in flight (submitted, not yet taken) cover `ahead_tokens` of rendered tokens (two of the job's batches:
    the workers fill the next batch while the engine runs one), at least 16 rows per worker."""

    def __init__(self, preparer: Preparer, workers: int, ahead_tokens: int = 0):
        self.preparer, self.workers, self.ahead_tokens = preparer, workers, ahead_tokens
        self._executor: ProcessPoolExecutor | None = None
        self._procs: dict[int, Any] = {}  # every worker started, by pid: a broken pool may forget its own
        if workers > 0:
            # fork, as torch's DataLoader does: workers start at once with the processor already loaded.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                                 initializer=_init_worker, initargs=(preparer,))

    def prepare(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, tuple[Sample, Rendered] | RejectError]]:
        if self._executor is None:
            for task in tasks:
                yield task, self.preparer(task)
            return
        window: deque[tuple[Task, Future]] = deque()
        floor = self.workers * ROWS_IN_FLIGHT_PER_WORKER
        limit, taken, tokens = floor, 0, 0
        it = iter(tasks)
        while True:
            task = None
            try:
                while len(window) < limit and (task := next(it, None)) is not None:
                    window.append((task, self._executor.submit(_prepare_in_worker, task)))
                    self._procs.update(_pool_processes(self._executor))
                if not window:
                    return
                task, future = window[0]
                result = future.result()
            except BrokenProcessPool:
                rows = [t.row.index for t, _ in window] + ([task.row.index] if task is not None else [])
                raise RenderWorkerError(f"a render worker died ({self._death()}) with manifest rows "
                                        f"{min(rows)}..{max(rows)} in flight") from None
            window.popleft()
            if not isinstance(result, RejectError):
                taken, tokens = taken + 1, tokens + len(result[1].input_ids)
                limit = min(MAX_ROWS_IN_FLIGHT, max(floor, self.ahead_tokens * taken // max(tokens, 1)))
            yield task, result

    def _death(self) -> str:
        """How the workers ended, e.g. 'worker pid 123 killed by SIGKILL, often the out-of-memory killer'."""
        out = []
        for pid, p in list({**self._procs, **_pool_processes(self._executor)}.items()):
            # The pool may see a worker die before its status is collected, and the pool's own thread may reap it
            # first (our waitpid then finds nothing): wait until one of us has the status, two seconds at most.
            deadline = time.monotonic() + 2
            while p.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.02)
            code = p.exitcode
            if code is not None and code < 0:
                name = signal.Signals(-code).name
                out.append(f"worker pid {pid} killed by {name}"
                           + (", often the out-of-memory killer" if name == "SIGKILL" else ""))
            elif code:
                out.append(f"worker pid {pid} exited with status {code}")
        return "; ".join(out) or "no exit status known"

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
