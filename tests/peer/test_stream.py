"""Streaming from a real swarm into this process: in order, early, and past a stall, chunk by
chunk as the node reads a blob."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from common.chunks import chunks_in
from peer.config import PeerConfig
from peer.engine import ChunkedBlob, Peer
from peer.stream import Fallback, Stalled
from tests.peer.swarm import Blob, MiB, Swarm, cached_bytes, make_blob

RATE = 16 * MiB  # the seeder's upload limit: the 64 MiB blob takes ~4 s
CHUNK = 32 * MiB  # two chunks: offsets are the chunk's own


@pytest.fixture(scope="module")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    return make_blob(tmp_path_factory.mktemp("blob"), 64 * MiB, seed=1)


@pytest_asyncio.fixture
async def swarm(tmp_path: Path, big_blob: Blob) -> AsyncIterator[Swarm]:
    swarm = Swarm(tmp_path, big_blob, chunk_size=CHUNK)
    yield swarm
    await swarm.close()


@pytest_asyncio.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    config = PeerConfig(cache_dir=tmp_path / "local", peer_listen="127.0.0.9:0", stall_timeout=4)
    async with Peer(config) as peer:
        yield peer


async def leech(swarm: Swarm, peer: Peer, rate: int = RATE) -> ChunkedBlob:
    seeder = await swarm.start(swarm.job("seeder", "127.0.0.2", "seed", upload_rate_limit=rate))
    download = await peer.open(
        swarm.blob.digest, swarm.blob.size, swarm.chunk_size, swarm.credentials("local")
    )
    for chunk in swarm.chunks:
        await download.leech(chunk.index, swarm.metainfo[chunk.index])
    host, _, port = seeder.address.rpartition(":")
    download.connect(host, int(port))  # remembered: the torrents dial it again as they need
    return download


async def read(
    download: ChunkedBlob, start: int = 0, end: int | None = None, fallback: Fallback | None = None
) -> AsyncIterator[bytes]:
    """Blob bytes [start, end) chunk after chunk, as the node serves a layer."""
    end = download.size if end is None else end
    for chunk in chunks_in(download.chunks, start, end):
        lo, hi = max(start, chunk.start) - chunk.start, min(end, chunk.end) - chunk.start
        async for data in download.stream(chunk.index, lo, hi, fallback):
            yield data


async def test_stream_yields_bytes_in_order_before_the_blob_is_complete(swarm: Swarm, peer: Peer) -> None:
    download = await leech(swarm, peer)
    started = time.monotonic()
    received = bytearray()
    async for data in read(download):
        if not received:
            first_byte = time.monotonic() - started
            assert download.left() > download.size / 2
        received += data
    assert first_byte < 2.5  # the first dial tick is 1 s
    assert bytes(received) == swarm.blob.data
    await download.completed()
    assert (
        hashlib.sha256(cached_bytes(peer.config.cache_dir, swarm.blob.digest)).hexdigest()
        == swarm.blob.digest.hex
    )


async def test_stream_honours_a_range_across_chunks_and_can_be_abandoned(swarm: Swarm, peer: Peer) -> None:
    download = await leech(swarm, peer)
    start, end = CHUNK - 3 * MiB + 12345, CHUNK + 5 * MiB + 777
    received = bytearray()
    async for data in read(download, start, end):
        received += data
    assert bytes(received) == swarm.blob.data[start:end]
    stream = download.stream(1, 20 * MiB)
    assert len(await anext(stream)) > 0
    await stream.aclose()  # a client that hangs up: deadlines are cleared, the download goes on
    await download.completed()


async def test_stall_without_fallback_names_the_missing_range(swarm: Swarm, peer: Peer) -> None:
    download = await leech(swarm, peer, rate=4 * MiB)
    position = 0
    with pytest.raises(Stalled) as stalled:
        async for data in download.stream(0):
            position += len(data)
            if position >= 2 * MiB and swarm.procs[0].proc.returncode is None:
                swarm.procs[0].kill()
    assert stalled.value.offset == position  # in the chunk
    assert stalled.value.end == CHUNK


async def test_stall_falls_back_and_the_blob_still_completes_and_seeds(swarm: Swarm, peer: Peer) -> None:
    download = await leech(swarm, peer, rate=4 * MiB)
    asked: list[tuple[int, int]] = []
    chunk_start = 0

    async def registry(start: int, end: int) -> AsyncIterator[bytes]:
        asked.append((start, end))
        for offset in range(chunk_start + start, chunk_start + end, 100_000):
            yield swarm.blob.data[offset : min(chunk_start + end, offset + 100_000)]

    received = bytearray()
    for chunk in swarm.chunks:
        chunk_start = chunk.start
        async for data in download.stream(chunk.index, fallback=registry):
            received += data
            if len(received) >= 2 * MiB and swarm.procs[0].proc.returncode is None:
                swarm.procs[0].kill()
    assert bytes(received) == swarm.blob.data
    # Each chunk stalled once and asked for its own rest, whole pieces up to its end.
    assert [end for _, end in asked] == [CHUNK, CHUNK]
    assert all(start % swarm.piece_size == 0 for start, _ in asked)
    await asyncio.wait_for(download.completed(), 30)
    assert cached_bytes(peer.config.cache_dir, swarm.blob.digest) == swarm.blob.data
    other = await swarm.start(swarm.job("other", "127.0.0.5", "fetch", connect=[f"127.0.0.9:{peer.port}"]))
    await other.event("complete")


async def test_a_reader_slower_than_the_swarm_is_not_a_stall(swarm: Swarm, peer: Peer) -> None:
    """The whole blob arrives, then the reader takes longer than `stall_timeout` to get to the rest
    (a busy client): every byte still comes from the torrents, none from the registry."""
    download = await leech(swarm, peer, rate=64 * MiB)
    asked: list[tuple[int, int]] = []

    async def registry(start: int, end: int) -> AsyncIterator[bytes]:
        asked.append((start, end))
        yield swarm.blob.data[start:end]

    received = bytearray()
    async for data in read(download, fallback=registry):
        if not received:
            await asyncio.wait_for(download.completed(), 30)
            await asyncio.sleep(peer.config.stall_timeout + 1)  # nothing arrives: nothing is missing
        received += data
    assert asked == []
    assert bytes(received) == swarm.blob.data
