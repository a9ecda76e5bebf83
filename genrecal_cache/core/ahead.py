"""Work done ahead of use with bounded memory: `fn(item)` for each item, in order, at most `window` items computed
ahead on a thread pool (reading from an object store waits on the network, not the CPU: the reads overlap).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, TypeVar

T = TypeVar("T")


def ahead(fn: Callable[[Any], T], items: Iterable[Any], window: int) -> Iterator[T]:
    """`map(fn, items)` with up to `window` results computed ahead (0: none, in this thread). An exception is
    raised when its item's turn comes; items not yet started are dropped when the consumer stops early."""
    if window <= 0:
        yield from map(fn, items)
        return
    pool = futures.ThreadPoolExecutor(window, thread_name_prefix="genrecal-ahead")
    pending: deque[futures.Future] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            done = pending.popleft()
            for item in it:  # keep `window` in flight: one more for the one taken
                pending.append(pool.submit(fn, item))
                break
            yield done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
