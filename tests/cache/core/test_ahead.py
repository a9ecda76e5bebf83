"""`ahead`: results in order, at most `window` computed ahead of the one in use, an error raised at its item's turn,
and nothing more started once the consumer stops."""

from __future__ import annotations

import threading
import time

import pytest

from genrecal_cache.core.ahead import ahead


class Counting:
    """fn(item) = item * 10, slowest for the first items (so later ones finish first), counting calls in flight."""

    def __init__(self) -> None:
        self.lock, self.running, self.most, self.started = threading.Lock(), 0, 0, []

    def __call__(self, i: int) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(i)
        time.sleep(0.02 * max(0, 5 - i))
        with self.lock:
            self.running -= 1
        return i * 10


@pytest.mark.parametrize("window", [0, 1, 3])
def test_results_come_in_order_with_at_most_window_in_flight(window):
    fn = Counting()
    assert list(ahead(fn, range(12), window)) == [i * 10 for i in range(12)]
    assert fn.most == max(window, 1) and sorted(fn.started) == list(range(12))


def test_an_error_is_raised_at_its_turn_and_the_earlier_results_come_first():
    def fn(i: int) -> int:
        if i == 4:
            raise ValueError("item 4")
        return i

    got = []
    with pytest.raises(ValueError, match="item 4"):
        for x in ahead(fn, range(10), 3):
            got.append(x)
    assert got == [0, 1, 2, 3]


def test_a_consumer_that_stops_starts_no_more_work():
    fn = Counting()
    it = ahead(fn, range(100), 2)
    assert [next(it), next(it)] == [0, 10]
    it.close()
    assert len(fn.started) <= 4  # the two taken and at most two ahead, never the rest
