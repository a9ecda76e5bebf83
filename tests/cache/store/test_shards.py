"""Shards encoded directly are the bytes zarr writes (every dtype a part holds, the tail shard rewritten as commits
grow it, an all-zero chunk), zarr reads them back, and an array with other codecs is left to zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import GzipCodec

from genrecal_cache.store.format import ARRAY_CONFIG, codecs, shard_file
from genrecal_cache.store.shards import ShardEncoder, write_shard


def _array(root, dtype, width, compressors=None):
    shape = (lambda n: (n,)) if width is None else (lambda n: (n, width))
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    arr = group.create_array("x", shape=shape(0), chunks=shape(4), shards=shape(16), dtype=dtype, fill_value=0,
                             compressors=compressors or codecs(), config=ARRAY_CONFIG)
    return arr, shape


@pytest.mark.parametrize("dtype, width", [("uint16", 8), ("int32", None), ("uint8", None), ("float32", 5)])
def test_direct_shards_are_the_bytes_zarr_writes(tmp_path, dtype, width):
    arr, shape = _array(tmp_path / "zarr", dtype, width)
    enc = ShardEncoder.of(arr)
    assert enc is not None
    data = np.random.default_rng(0).integers(0, 200, shape(45)).astype(dtype)
    data[4:8] = 0  # an all-zero chunk is written too (write_empty_chunks)
    direct, shape_direct = _array(tmp_path / "direct", dtype, width)
    done, compared = 0, 0
    for n in (13, 37, 45):  # commits as the writer makes them: the tail shard rewritten whole each time
        arr.resize(shape(n))
        direct.resize(shape(n))
        for s in range(done - done % 16, n, 16):
            e = min(s + 16, n)
            arr[s:e] = data[s:e]
            blob = enc.encode(data[s:e])
            assert blob == shard_file(tmp_path / "zarr" / "x", s // 16, width is not None).read_bytes(), (n, s)
            write_shard(shard_file(tmp_path / "direct" / "x", s // 16, width is not None), blob)
            compared += 1
        done = n
    assert compared == 5  # shard 0; shards 0, 1, 2; shard 2
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "direct" / "x"))[:], data)
    assert not list((tmp_path / "direct").rglob("*.partial"))


def test_other_codecs_are_left_to_zarr_and_bad_rows_are_refused(tmp_path):
    arr, _ = _array(tmp_path / "gzip", "int32", None, compressors=[GzipCodec()])
    assert ShardEncoder.of(arr) is None
    enc = ShardEncoder.of(_array(tmp_path / "ok", "uint16", 8)[0])
    with pytest.raises(ValueError, match="a shard holds 1 to 16 rows of shape \\(8,\\)"):
        enc.encode(np.zeros((17, 8), np.uint16))


def test_rows_are_taken_across_the_pieces_they_came_in():
    from genrecal_cache.store.shards import Rows

    pieces = [np.zeros((0, 2)), np.arange(6).reshape(3, 2), np.zeros((0, 2)), np.arange(6, 14).reshape(4, 2)]
    rows, whole = Rows(pieces, 16), np.arange(14).reshape(7, 2)
    assert rows.end == 23
    for a in range(16, 24):
        for b in range(a, 24):
            np.testing.assert_array_equal(rows.take(a, b), whole[a - 16 : b - 16], err_msg=f"{a}..{b}")
    assert np.shares_memory(rows.take(17, 19), pieces[1])  # inside one piece: a view, no copy
