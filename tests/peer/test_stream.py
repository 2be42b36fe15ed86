"""Streaming from a real swarm into this process: in order, early, and past a stall."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from peer.config import PeerConfig
from peer.engine import Blob as Download
from peer.engine import Peer
from peer.stream import Stalled
from tests.peer.swarm import Blob, MiB, Swarm, make_blob

RATE = 16 * MiB  # the seeder's upload limit: the 64 MiB blob takes ~4 s


@pytest.fixture(scope="module")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    return make_blob(tmp_path_factory.mktemp("blob"), 64 * MiB, seed=1)


@pytest_asyncio.fixture
async def swarm(tmp_path: Path, big_blob: Blob) -> AsyncIterator[Swarm]:
    swarm = Swarm(tmp_path, big_blob)
    yield swarm
    await swarm.close()


@pytest_asyncio.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    config = PeerConfig(cache_dir=tmp_path / "local", peer_listen="127.0.0.9:0", stall_timeout=4)
    async with Peer(config) as peer:
        yield peer


async def leech(swarm: Swarm, peer: Peer, rate: int = RATE) -> tuple[Download, asyncio.Task[None]]:
    seeder = await swarm.start(swarm.job("seeder", "127.0.0.2", "seed", upload_rate_limit=rate))
    download = await peer.fetch(swarm.blob.digest, swarm.metainfo, swarm.credentials("local"))
    return download, asyncio.create_task(dial(download, seeder.address))


async def dial(download: Download, address: str) -> None:
    host, _, port = address.rpartition(":")
    while True:
        download.connect(host, int(port))
        await asyncio.sleep(1)


async def test_stream_yields_bytes_in_order_before_the_blob_is_complete(swarm: Swarm, peer: Peer) -> None:
    download, dialer = await leech(swarm, peer)
    started = time.monotonic()
    received = bytearray()
    async for chunk in download.stream():
        if not received:
            first_byte = time.monotonic() - started
            assert download.torrent.status().progress < 0.5
        received += chunk
    dialer.cancel()
    assert first_byte < 2.5  # the first dial tick is 1 s
    assert bytes(received) == swarm.blob.data
    path = await download.complete()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == swarm.blob.digest.hex


async def test_stream_honours_a_range_and_can_be_abandoned(swarm: Swarm, peer: Peer) -> None:
    download, dialer = await leech(swarm, peer)
    start, end = 3 * MiB + 12345, 9 * MiB + 777
    received = bytearray()
    async for chunk in download.stream(start, end):
        received += chunk
    assert bytes(received) == swarm.blob.data[start:end]
    stream = download.stream(20 * MiB)
    assert len(await anext(stream)) > 0
    await stream.aclose()  # a client that hangs up: deadlines are cleared, the download goes on
    await download.complete()
    dialer.cancel()


async def test_stall_without_fallback_names_the_missing_range(swarm: Swarm, peer: Peer) -> None:
    download, dialer = await leech(swarm, peer, rate=4 * MiB)
    position = 0
    with pytest.raises(Stalled) as stalled:
        async for chunk in download.stream():
            position += len(chunk)
            if position >= 2 * MiB and swarm.procs[0].proc.returncode is None:
                swarm.procs[0].kill()
    dialer.cancel()
    assert stalled.value.offset == position
    assert stalled.value.end == swarm.blob.size


async def test_stall_falls_back_and_the_blob_still_completes_and_seeds(swarm: Swarm, peer: Peer) -> None:
    download, dialer = await leech(swarm, peer, rate=4 * MiB)
    asked: list[tuple[int, int]] = []

    async def registry(start: int, end: int) -> AsyncIterator[bytes]:
        asked.append((start, end))
        for offset in range(start, end, 100_000):
            yield swarm.blob.data[offset : min(end, offset + 100_000)]

    received = bytearray()
    async for chunk in download.stream(fallback=registry):
        received += chunk
        if len(received) >= 2 * MiB and swarm.procs[0].proc.returncode is None:
            swarm.procs[0].kill()
    dialer.cancel()
    assert bytes(received) == swarm.blob.data
    assert len(asked) == 1 and asked[0][1] == swarm.blob.size and asked[0][0] % swarm.piece_size == 0
    path = await asyncio.wait_for(download.complete(), 30)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == swarm.blob.digest.hex
    other = await swarm.start(swarm.job("other", "127.0.0.5", "fetch", connect=[f"127.0.0.9:{peer.port}"]))
    await other.event("complete")


async def test_a_reader_slower_than_the_swarm_is_not_a_stall(swarm: Swarm, peer: Peer) -> None:
    """The whole blob arrives, then the reader takes longer than `stall_timeout` to get to the rest
    (a busy client): every byte still comes from the torrent, none from the registry."""
    download, dialer = await leech(swarm, peer, rate=64 * MiB)
    asked: list[tuple[int, int]] = []

    async def registry(start: int, end: int) -> AsyncIterator[bytes]:
        asked.append((start, end))
        yield swarm.blob.data[start:end]

    received = bytearray()
    async for chunk in download.stream(fallback=registry):
        if not received:
            await asyncio.wait_for(download.complete(), 30)
            await asyncio.sleep(peer.config.stall_timeout + 1)  # nothing arrives: nothing is missing
        received += chunk
    dialer.cancel()
    assert asked == []
    assert bytes(received) == swarm.blob.data
