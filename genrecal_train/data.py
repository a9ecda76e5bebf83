"""Stream a teacher store for training: blocks of consecutive samples, shuffled per epoch from a seed, split
disjointly across ranks (and across DataLoader workers within a rank), each sample paired with the student's own
rendering of the same conversation.

The stream's position (epoch, samples consumed) is part of the trainer state, so a resumed run continues with the
very next batch, whatever the number of workers.
"""

from __future__ import annotations

import pickle
import queue
import random
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from genrecal_cache.core.ahead import ahead
from genrecal_cache.core.errors import RejectError, StoreError
from genrecal_cache.core.process import die_with_parent
from genrecal_cache.data.render import Rendered, Renderer
from genrecal_cache.data.rows import stored_sample
from genrecal_cache.store.reader import TeacherSample, TeacherStore

from .sequence import answer_spans

READ_AHEAD = 2  # blocks read ahead from an object store (without --num-workers): the next reads wait on the network


def is_heldout(sample_id: str, fraction: float) -> bool:
    """Whether a sample is held out from training (for the reliance check and the plots): decided by its id
    alone, so every run, rank and worker agrees."""
    return zlib.crc32(sample_id.encode()) % 10_000 < fraction * 10_000


def trains_on(sample_id: str, heldout_fraction: float) -> bool:
    """Not held out (a plain function: the stream's filter is pickled into DataLoader workers)."""
    return not is_heldout(sample_id, heldout_fraction)


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


@dataclass
class Block:
    """One block of the stream, loaded: the samples kept, each with its position in the block, and the rejects."""

    index: int  # position in the stream's plan: blocks are assembled into batches in this order
    epoch: int
    read: int  # samples of the block read (skipped and rejected ones included)
    samples: list[tuple[int, TrainSample]]
    rejected: dict[str, str]


def load_block(store: TeacherStore, renderer: Renderer, keep: Callable[[str], bool] | None, index: int,
               epoch: int, k: int, start: int, stop: int) -> Block:
    """Read samples [start, stop) of part k and render the student's side of those kept. A sample the student
    cannot take is a reject; any other failure is raised naming the sample."""
    part = store.parts[k]
    try:
        teachers = part.read(start, stop)
    except Exception as e:
        ids = part.samples.column("sample_id")
        raise StoreError(f"{e} (samples {ids[start]} to {ids[stop - 1]})") from e
    block = Block(index, epoch, stop - start, [], {})
    for i, t in enumerate(teachers):
        if keep is not None and not keep(t.sample_id):
            continue
        try:
            item = pair(t, renderer, store.path)
        except (RejectError, ValueError, OSError) as e:
            block.rejected[t.sample_id] = getattr(e, "reason", str(e))
            continue
        except Exception as e:
            raise RuntimeError(f"preparing sample {t.sample_id!r} (part {part.name}, row {start + i}) failed: "
                               f"{type(e).__name__}: {e}") from e
        block.samples.append((i, item))
    return block


def pair(t: TeacherSample, renderer: Renderer, root: Path) -> TrainSample:
    """The student's rendering of a stored sample; RejectError (or ValueError/OSError) if it cannot take it (an
    image kept by path that changed since is one)."""
    rendered = renderer.render(stored_sample(t, root))
    if len(answer_spans(rendered.segments)) != len(answer_spans(t.segments)):
        raise RejectError("the student and the teacher split the conversation into different turns")
    return TrainSample(t, rendered)


class StoreStream:
    """Batches of `TrainSample` from a store, one epoch at a time, resumable at a batch boundary. With
    `num_workers` > 0, blocks are read and rendered in DataLoader worker processes (see `_BlockDataset`); the
    batches are the same as with none."""

    def __init__(self, store: TeacherStore | Path | str, renderer: Renderer, batch_size: int, seed: int = 0,
                 block_size: int = 64, rank: int = 0, world: int = 1, keep: Callable[[str], bool] | None = None,
                 num_workers: int = 0):
        self.store = store if isinstance(store, TeacherStore) else TeacherStore(store)
        if len(self.store) == 0:
            raise ValueError(f"teacher store {self.store.path} has no committed samples; run cache-teacher first")
        self.renderer, self.batch_size, self.seed = renderer, batch_size, seed
        self.block_size, self.rank, self.world = block_size, rank, world
        self.keep = keep  # sample ids to train on (the rest, e.g. held out, are skipped unrendered)
        self.num_workers = num_workers
        self.state = StreamState()
        self.rejected: dict[str, str] = {}  # sample id -> why the student side could not be rendered

    def plan(self, epochs: int) -> list[tuple[int, int, int, int]]:
        """The blocks (epoch, part, start, stop) still to read, from `state` to the end of `epochs`."""
        out, skip = [], self.state.consumed
        for epoch in range(self.state.epoch, epochs):
            for k, start, stop in block_order(self.store, self.block_size, self.seed, epoch, self.rank, self.world):
                if skip >= stop - start:  # whole block already consumed: no read at all
                    skip -= stop - start
                    continue
                out.append((epoch, k, start + skip, stop))
                skip = 0
            skip = 0
        return out

    def blocks(self, epochs: int) -> Iterator[Block]:
        """The planned blocks, loaded, in plan order."""
        plan = self.plan(epochs)
        if self.num_workers == 0:  # from an object store, READ_AHEAD blocks read (and rendered) ahead of use
            window = READ_AHEAD if self.store.remote else 0
            return ahead(lambda ip: load_block(self.store, self.renderer, self.keep, ip[0], *ip[1]), enumerate(plan),
                         window)
        from torch.utils.data import DataLoader

        # Workers hand back pickled bytes, not objects holding tensors: tensors would travel as shared-memory
        # file descriptors, one per tensor of every sample in flight (thousands; past the open-files limit).
        # prefetch_factor 1: a block already holds many batches, and each block in flight costs its memory.
        # Workers open the parts planned here, by name: parts added since would shift the indices in the plan.
        parts = {p.name: len(p) for p in self.store.parts}
        # A remote store is reopened by its URL and --storage-options (credentials resolved in each worker).
        loader = DataLoader(_BlockDataset(self.store.path, parts, self.renderer, self.keep, plan, self.num_workers,
                                          self.store.storage_options),
                            batch_size=None, num_workers=self.num_workers, multiprocessing_context="spawn",
                            prefetch_factor=1, collate_fn=_identity, worker_init_fn=_die_with_parent)
        return (pickle.loads(b) for b in loader)

    def batches(self, epochs: int) -> Iterator[tuple[list[TrainSample], StreamState]]:
        """Every remaining batch until `epochs` epochs are done, each with the stream position after it (what a
        checkpoint must record once that batch is trained on); a batch never spans two epochs."""
        batch: list[TrainSample] = []
        epoch, consumed = self.state.epoch, self.state.consumed
        for n, block in enumerate(self.blocks(epochs)):
            # DataLoader returns its workers' items round-robin, so in plan order: check it, resume relies on it
            assert block.index == n, f"block {block.index} arrived in place of block {n}"
            if block.epoch != epoch:  # the previous epoch is done: its last, partial batch
                if batch:
                    yield batch, StreamState(epoch, consumed)
                batch, epoch, consumed = [], block.epoch, 0
            self.rejected.update(block.rejected)
            for i, item in block.samples:
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch, StreamState(epoch, consumed + i + 1)
                    batch = []
            consumed += block.read
        if batch:
            yield batch, StreamState(epoch, consumed)
        self.state = StreamState(epochs, 0)


def pairs(store: TeacherStore, renderer: Renderer, keep: Callable[[str], bool], limit: int) -> list[TrainSample]:
    """Up to `limit` samples whose ids `keep` accepts, in store order, each with the student's rendering
    (samples the student cannot take are passed over). Reads one sample at a time: for a few samples only."""
    return [s for _, _, s in located_pairs(store, renderer, keep, limit)]


def located_pairs(store: TeacherStore, renderer: Renderer, keep: Callable[[str], bool], limit: int
                  ) -> Iterator[tuple[int, int, TrainSample]]:
    """`pairs`, each with where it is: its part's index in `store.parts` and its row in that part."""
    n = 0
    for k, p in enumerate(store.parts):
        for i, sid in enumerate(p.samples.column("sample_id").to_pylist()):
            if n >= limit:
                return
            if keep(sid):
                try:
                    item = pair(p.read(i, i + 1)[0], renderer, store.path)
                except (RejectError, ValueError, OSError):
                    continue
                n += 1
                yield k, i, item


def _identity(x: Any) -> Any:
    return x


def _die_with_parent(_: int) -> None:
    """A DataLoader worker's init: it ends with its trainer (a trainer killed with SIGKILL would otherwise leave
    its workers behind, blocked writing to a pipe nobody reads)."""
    die_with_parent()


class _BlockDataset(IterableDataset):
    """The plan's blocks for DataLoader workers: worker w loads blocks w, w+N, w+2N, ... (disjoint, and handed
    back round-robin, i.e. in plan order). Each worker opens the store itself (an open store holds zarr's event
    loop thread, which must not cross a process boundary), exactly the `parts` (name: samples) the plan was made
    from; the renderer is pickled into it."""

    def __init__(self, path: Path | str, parts: dict[str, int], renderer: Renderer,
                 keep: Callable[[str], bool] | None, plan: list[tuple[int, int, int, int]], num_workers: int,
                 storage_options: dict[str, Any] | None = None):
        self.path, self.parts, self.renderer, self.keep = path, parts, renderer, keep
        self.plan, self.num_workers, self.storage_options = plan, num_workers, storage_options or {}

    def __iter__(self) -> Iterator[bytes]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        assert info is not None and info.num_workers == self.num_workers, "use through a DataLoader's workers"
        store = TeacherStore(self.path, self.parts, storage_options=self.storage_options)
        for i in range(info.id, len(self.plan), info.num_workers):
            block = load_block(store, self.renderer, self.keep, i, *self.plan[i])
            yield pickle.dumps(block, protocol=pickle.HIGHEST_PROTOCOL)


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead, so reading the store and rendering the
    student's side overlap the training step. Items come out in order; an exception is re-raised here.
    `close()` stops the thread and closes the iterator: a thread left filling its queue when training stops
    early (--max-steps) would otherwise run torch work into interpreter shutdown and abort the process."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="genrecal-prefetch")
        self._thread.start()

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                self._q.put(item)
                if self._stop.is_set():
                    break
            else:
                self._q.put(self._END)
        except BaseException as e:  # handed to the consumer
            self._q.put(e)
        finally:
            if hasattr(it, "close"):
                it.close()  # a generator: its own cleanup (DataLoader workers, open files) runs now

    def close(self) -> None:
        """Stop the producer and wait for it (it may be blocked on a full queue: keep draining)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._done = True

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        if self._done:  # asked again after the end (a rank out of data keeps asking while others train)
            raise StopIteration
        item = self._q.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item
