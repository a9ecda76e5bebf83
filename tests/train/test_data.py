"""The store stream with DataLoader workers: the very batches and resume positions of the in-process stream,
and a failure inside a worker names the sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from genrecal_cache.core.models import load_processor
from genrecal_cache.data.render import Renderer
from genrecal_train.data import StoreStream, StreamState


class _FailsOn(Renderer):
    """Renders like its parent, except one sample, on which it hits an unexpected error (not a reject)."""

    def __init__(self, processor, sample_id: str):
        super().__init__(processor)
        self.sample_id = sample_id

    def render(self, sample):
        if sample.sample_id == self.sample_id:
            raise KeyError("unexpected")
        return super().render(sample)


@pytest.fixture(scope="module")
def store(zoo, clean_manifest, tmp_path_factory) -> Path:
    # Imported here, not at the top: workers import this module to unpickle _FailsOn.
    from .test_trainer import _store

    return _store(zoo, clean_manifest, tmp_path_factory.mktemp("data") / "store")


def _keep(sample_id: str) -> bool:
    """Skips some samples (they still count in the stream position); importable in a worker."""
    return not sample_id.endswith("3")


def _ids(stream: StoreStream, epochs: int) -> list[tuple[list[str], StreamState]]:
    return [([s.teacher.sample_id for s in b], st) for b, st in stream.batches(epochs)]


def test_workers_give_the_same_batches_and_resume_positions(store, zoo):
    renderer = Renderer(load_processor(zoo["idefics3"]))
    inline = _ids(StoreStream(store, renderer, 2, seed=1, block_size=5, keep=_keep), epochs=2)
    # Resume where a checkpoint could: in the second epoch, 4 samples in (inside a block, whatever the order of
    # the blocks of 5, 5 and 2 samples), after a skipped sample.
    middle = next(i for i, (_, st) in enumerate(inline) if st == StreamState(1, 4)) + 1
    stream = StoreStream(store, renderer, 2, seed=1, block_size=5, keep=_keep, num_workers=2)
    stream.state = inline[middle - 1][1]
    assert _ids(stream, epochs=2) == inline[middle:]


def test_a_worker_failure_names_the_sample(store, zoo):
    bad = StoreStream(store, Renderer(load_processor(zoo["idefics3"])), 2).store.parts[0].samples["sample_id"][4]
    stream = StoreStream(store, _FailsOn(load_processor(zoo["idefics3"]), str(bad)), 2, num_workers=2)
    with pytest.raises(RuntimeError, match=f"preparing sample '{bad}'.*KeyError"):
        list(stream.batches(1))


def test_workers_read_the_parts_the_stream_planned_even_after_a_part_is_added(zoo, clean_manifest, tmp_path):
    """Training starts on a store with one shard done (`--shard 1/2`); shard 0 is committed while it runs and its
    part sorts first. Workers must read the planned part (not whatever is at its index in the store now)."""
    from genrecal_cache.job.config import CacheConfig
    from genrecal_cache.job.launch import run_cache

    def cache(shard: str) -> None:
        run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=clean_manifest, output=tmp_path / "s",
                              dtype="float32", device="cpu", shard=shard, progress=False, command=["t"]))

    cache("1/2")
    renderer = Renderer(load_processor(zoo["idefics3"]))
    planned = _ids(StoreStream(tmp_path / "s", renderer, 2, seed=3, block_size=2), epochs=1)
    stream = StoreStream(tmp_path / "s", renderer, 2, seed=3, block_size=2, num_workers=1)
    cache("0/2")
    assert next(p.name for p in StoreStream(tmp_path / "s", renderer, 2).store.parts) == "shard-00000-of-00002"
    assert _ids(stream, epochs=1) == planned
