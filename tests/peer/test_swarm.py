"""Real libtorrent peers in separate processes, over SSL on loopback addresses."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from common.certs import new_ca
from peer.config import PeerConfig
from peer.engine import Peer
from tests.peer.swarm import Blob, MiB, Swarm, make_blob


@pytest.fixture(scope="module")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    return make_blob(tmp_path_factory.mktemp("blob"), 64 * MiB)


@pytest_asyncio.fixture
async def swarm(tmp_path: Path, big_blob: Blob) -> AsyncIterator[Swarm]:
    swarm = Swarm(tmp_path, big_blob)
    yield swarm
    await swarm.close()


@pytest_asyncio.fixture
async def chunked(tmp_path: Path, big_blob: Blob) -> AsyncIterator[Swarm]:
    """The same blob as four chunk torrents."""
    swarm = Swarm(tmp_path, big_blob, chunk_size=16 * MiB)
    yield swarm
    await swarm.close()


@pytest.mark.parametrize("peers", [2, 4])
async def test_peers_move_a_blob(swarm: Swarm, peers: int) -> None:
    nodes = [await swarm.start(swarm.job("seeder", "127.0.0.2", "seed"))]
    for index in range(1, peers):
        job = swarm.job(
            f"leecher{index}", f"127.0.0.{index + 2}", "fetch", connect=[n.address for n in nodes]
        )
        nodes.append(await swarm.start(job))
    for leecher in nodes[1:]:
        await leecher.event("complete")
        assert hashlib.sha256(leecher.cached()).hexdigest() == swarm.blob.digest.hex


async def test_chunks_seeded_by_different_peers_make_the_blob(chunked: Swarm) -> None:
    """Each chunk has its own seeder, none of which has the blob; one certificate for the blob
    opens every chunk torrent of the leecher, which dials every seeder on every chunk."""
    seeders = []
    for index in range(len(chunked.chunks)):
        job = chunked.job(f"seeder{index}", f"127.0.0.{index + 2}", "seed", chunks=[index])
        seeders.append(await chunked.start(job))
    leecher = await chunked.start(
        chunked.job("leecher", "127.0.0.9", "fetch", connect=[seeder.address for seeder in seeders])
    )
    await leecher.event("complete")
    assert leecher.cached() == chunked.blob.data
    for seeder in seeders:  # each sent its own chunk
        assert await seeder.reaches("uploaded", chunked.chunk_size)


@pytest.mark.parametrize("wrong", ["other_ca", "other_blob"])
async def test_a_peer_with_the_wrong_certificate_gets_no_data(
    chunked: Swarm, wrong: str, tmp_path: Path
) -> None:
    """Neither another cluster's certificate nor one for another blob opens any chunk torrent."""
    if wrong == "other_ca":
        creds = chunked.credentials("intruder", ca=new_ca("another cluster"))
    else:
        creds = chunked.credentials("intruder", digest=make_blob(tmp_path, 1000, seed=7).digest)
    seeder = await chunked.start(chunked.job("seeder", "127.0.0.2", "seed", upload_rate_limit=16 * MiB))
    intruder = await chunked.start(
        chunked.job("intruder", "127.0.0.3", "fetch", creds, connect=[seeder.address])
    )
    honest = await chunked.start(chunked.job("honest", "127.0.0.4", "fetch", connect=[seeder.address]))
    progress = await intruder.last_progress(4.0)
    assert progress["downloaded"] == 0 and progress["peers"] == 0
    honest_progress = await honest.last_progress(0.6)
    assert honest_progress["downloaded"] > 0  # the seeder was there to be had


async def test_altered_seeder_is_outvoted_by_honest_ones(swarm: Swarm) -> None:
    liar = await swarm.start(swarm.job("liar", "127.0.0.2", "seed", corrupt=True))
    leecher = await swarm.start(swarm.job("leecher", "127.0.0.4", "fetch", connect=[liar.address]))
    while not (await leecher.last_progress(0.6)).get("failed"):
        pass  # the liar's pieces fail verification
    # The honest seeder comes once the liar is known bad: libtorrent blames every peer that sent
    # blocks of a failed piece, so a piece mixed from both can get an honest peer banned too.
    honest = await swarm.start(swarm.job("honest", "127.0.0.3", "seed"))
    await leecher.dial(honest.address)  # seeders dial nobody: leechers find them
    await leecher.event("complete")
    assert hashlib.sha256(leecher.cached()).hexdigest() == swarm.blob.digest.hex


async def test_killed_download_leaves_no_partial_blob_after_restart(chunked: Swarm) -> None:
    seeder = await chunked.start(chunked.job("seeder", "127.0.0.2", "seed", upload_rate_limit=16 * MiB))
    job = chunked.job("victim", "127.0.0.3", "fetch", connect=[seeder.address])
    victim = await chunked.start(job)
    cache = Path(job.cache_dir)
    progress = await victim.last_progress(0.6)
    while progress["progress"] < 0.4:  # past libtorrent's 16 MiB write queue: bytes are on disk
        progress = await victim.last_progress(0.6)
    victim.kill()
    await victim.proc.wait()
    assert progress["progress"] < 1
    assert any((cache / "chunks" / chunked.blob.digest.hex).iterdir())
    async with Peer(PeerConfig(cache_dir=cache, peer_listen="127.0.0.3:0")) as peer:
        assert peer.get(chunked.blob.digest) is None
        assert chunked.blob.digest not in peer.cache
        assert not any((cache / "chunks").iterdir())
        assert not any((cache / "torrents").iterdir())


async def test_cached_blob_is_seeded_again_after_a_restart(chunked: Swarm) -> None:
    seeder = await chunked.start(chunked.job("seeder", "127.0.0.2", "seed"))
    first = await chunked.start(chunked.job("first", "127.0.0.3", "fetch", connect=[seeder.address]))
    await first.event("complete")
    await first.stop()
    await seeder.stop()
    again = await chunked.start(chunked.job("first", "127.0.0.3", "restart"))
    second = await chunked.start(chunked.job("second", "127.0.0.4", "fetch", connect=[again.address]))
    await second.event("complete")
    assert second.cached() == chunked.blob.data
