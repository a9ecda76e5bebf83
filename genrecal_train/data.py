"""Stream a teacher store for training: blocks of consecutive samples, shuffled per epoch from a seed, split
disjointly across ranks, each sample paired with the student's own rendering of the same conversation.

The stream's position (epoch, batches taken) is part of the trainer state, so a resumed run continues with the
very next batch.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from genrecal_cache.chat import Rendered, Renderer
from genrecal_cache.dataset import Row, parse_row
from genrecal_cache.errors import RejectError
from genrecal_cache.store import TeacherSample, TeacherStore

from .sequence import answer_spans


@dataclass
class TrainSample:
    """A stored teacher sample with the student's rendering of the same conversation."""

    teacher: TeacherSample
    student: Rendered


@dataclass
class StreamState:
    epoch: int = 0
    consumed: int = 0  # samples of this rank's epoch order already read into batches (rejected ones included)


def block_order(store: TeacherStore, block_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
                ) -> list[tuple[int, int, int]]:
    """This rank's blocks (part index, start, stop) for an epoch: all blocks shuffled from (seed, epoch), then
    dealt round-robin to ranks, so ranks never share a sample."""
    blocks = [(k, s, min(s + block_size, len(p))) for k, p in enumerate(store.parts)
              for s in range(0, len(p), block_size)]
    random.Random(seed * 1_000_003 + epoch).shuffle(blocks)
    return blocks[rank::world]


class StoreStream:
    """Batches of `TrainSample` from a store, one epoch at a time, resumable at a batch boundary."""

    def __init__(self, store: TeacherStore | Path | str, renderer: Renderer, batch_size: int, seed: int = 0,
                 block_size: int = 64, rank: int = 0, world: int = 1, keep: Callable[[str], bool] | None = None):
        self.store = store if isinstance(store, TeacherStore) else TeacherStore(store)
        if len(self.store) == 0:
            raise ValueError(f"teacher store {self.store.path} has no committed samples; run cache-teacher first")
        self.renderer, self.batch_size, self.seed = renderer, batch_size, seed
        self.block_size, self.rank, self.world = block_size, rank, world
        self.keep = keep  # sample ids to train on (the rest, e.g. held out, are skipped unread)
        self.state = StreamState()
        self.rejected: dict[str, str] = {}  # sample id -> why the student side could not be rendered

    def batches(self, epochs: int) -> Iterator[tuple[list[TrainSample], StreamState]]:
        """Every remaining batch until `epochs` epochs are done, each with the stream position after it (what a
        checkpoint must record once that batch is trained on)."""
        while self.state.epoch < epochs:
            for batch in self.epoch_batches():
                yield batch, StreamState(self.state.epoch, self.state.consumed)
        return

    def epoch_batches(self) -> Iterator[list[TrainSample]]:
        """The rest of the current epoch's batches; advances `state` as batches are taken."""
        consumed = skip = self.state.consumed
        batch: list[TrainSample] = []
        for k, start, stop in block_order(self.store, self.block_size, self.seed, self.state.epoch, self.rank,
                                          self.world):
            if skip >= stop - start:  # whole block already consumed: no read at all
                skip -= stop - start
                continue
            for t in self.store.parts[k].read(start + skip, stop):
                consumed += 1
                if self.keep is not None and not self.keep(t.sample_id):
                    continue
                item = self._pair(t)
                if item is not None:
                    batch.append(item)
                if len(batch) == self.batch_size:
                    self.state.consumed = consumed
                    yield batch
                    batch = []
            skip = 0
        if batch:
            self.state.consumed = consumed
            yield batch
        self.state = StreamState(self.state.epoch + 1, 0)

    def _pair(self, t: TeacherSample) -> TrainSample | None:
        """Render the student's side; a sample the student cannot take is counted and skipped, not fatal."""
        try:
            images = [img if img is not None else Path(p).read_bytes() for img, p in zip(t.images, t.image_paths)]
            sample = parse_row(Row(t.source_row, {"id": t.sample_id, "messages": t.messages, "images": images}),
                               self.store.path)
            rendered = self.renderer.render(sample)
            if len(answer_spans(rendered.segments)) != len(answer_spans(t.segments)):
                raise RejectError("the student and the teacher split the conversation into different turns")
            return TrainSample(t, rendered)
        except (RejectError, ValueError, OSError) as e:
            self.rejected[t.sample_id] = getattr(e, "reason", str(e))
            return None


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead, so reading the store and rendering the
    student's side overlap the training step. Items come out in order; an exception is re-raised here."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                self._q.put(item)
            self._q.put(self._END)
        except BaseException as e:  # handed to the consumer
            self._q.put(e)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item
