"""A chunk origin's registry download in parts: how a chunk is split, and what readers may read."""

from __future__ import annotations

import pytest

from common.chunks import Chunk
from proxy.fetch import ChunkDownload, split
from tracker.client import ChunkLease

MIB = 2**20


@pytest.mark.parametrize(
    ("chunk", "count", "ranges"),
    [
        (Chunk(3, 8 * MIB, 16 * MIB), 2, [(8 * MIB, 12 * MIB), (12 * MIB, 16 * MIB)]),
        (Chunk(0, 0, 10), 3, [(0, 3), (3, 6), (6, 10)]),
        (Chunk(0, 0, 10), 1, [(0, 10)]),
        (Chunk(1, 5, 7), 4, [(5, 6), (6, 7)]),  # never an empty part
    ],
)
def test_a_chunk_splits_into_consecutive_parts(
    chunk: Chunk, count: int, ranges: list[tuple[int, int]]
) -> None:
    parts = split(chunk, count)
    assert [(p.start, p.end) for p in parts] == ranges
    assert {p.index for p in parts} == {chunk.index}


@pytest.mark.parametrize(
    ("received", "written", "fetched"),
    [
        ([0, 0], 0, 0),
        ([0, 4], 0, 4),  # the second part alone: nothing readable in order yet
        ([3, 4], 3, 7),
        ([5, 2], 7, 7),  # the first part complete: the second one's bytes follow on
        ([5, 5], 10, 10),
    ],
)
async def test_readers_see_the_contiguous_prefix_the_lease_counts_everything(
    received: list[int], written: int, fetched: int
) -> None:
    chunk = Chunk(0, 0, 10)
    download = ChunkDownload(chunk, ChunkLease(0, "token", 20.0), split(chunk, 2))
    for part, count in enumerate(received):
        await download.advanced(part, count)
    assert (download.written, download.fetched) == (written, fetched)
