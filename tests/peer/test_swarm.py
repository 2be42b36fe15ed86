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
        assert hashlib.sha256(leecher.cached().read_bytes()).hexdigest() == swarm.blob.digest.hex


@pytest.mark.parametrize("wrong", ["other_ca", "other_blob"])
async def test_a_peer_with_the_wrong_certificate_gets_no_data(
    swarm: Swarm, wrong: str, tmp_path: Path
) -> None:
    if wrong == "other_ca":
        creds = swarm.credentials("intruder", ca=new_ca("another cluster"))
    else:
        creds = swarm.credentials("intruder", digest=make_blob(tmp_path, 1000, seed=7).digest)
    seeder = await swarm.start(swarm.job("seeder", "127.0.0.2", "seed", upload_rate_limit=16 * MiB))
    intruder = await swarm.start(swarm.job("intruder", "127.0.0.3", "fetch", creds, connect=[seeder.address]))
    honest = await swarm.start(swarm.job("honest", "127.0.0.4", "fetch", connect=[seeder.address]))
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
    await swarm.start(swarm.job("honest", "127.0.0.3", "seed", connect=[leecher.address]))
    await leecher.event("complete")
    assert hashlib.sha256(leecher.cached().read_bytes()).hexdigest() == swarm.blob.digest.hex


async def test_killed_download_leaves_no_partial_blob_after_restart(swarm: Swarm) -> None:
    seeder = await swarm.start(swarm.job("seeder", "127.0.0.2", "seed", upload_rate_limit=16 * MiB))
    job = swarm.job("victim", "127.0.0.3", "fetch", connect=[seeder.address])
    victim = await swarm.start(job)
    cache = Path(job.cache_dir)
    progress = await victim.last_progress(0.6)
    while progress["progress"] < 0.4:  # past libtorrent's 16 MiB write queue: bytes are on disk
        progress = await victim.last_progress(0.6)
    victim.kill()
    await victim.proc.wait()
    assert progress["progress"] < 1
    assert any((cache / "partial").iterdir())
    async with Peer(PeerConfig(cache_dir=cache, peer_listen="127.0.0.3:0")) as peer:
        assert peer.get(swarm.blob.digest) is None
        assert swarm.blob.digest not in peer.cache
        assert not any((cache / "partial").iterdir())
        assert not any((cache / "torrents").iterdir())


async def test_cached_blob_is_seeded_again_after_a_restart(swarm: Swarm) -> None:
    seeder = await swarm.start(swarm.job("seeder", "127.0.0.2", "seed"))
    first = await swarm.start(swarm.job("first", "127.0.0.3", "fetch", connect=[seeder.address]))
    await first.event("complete")
    await first.stop()
    await seeder.stop()
    again = await swarm.start(swarm.job("first", "127.0.0.3", "restart"))
    second = await swarm.start(swarm.job("second", "127.0.0.4", "fetch", connect=[again.address]))
    await second.event("complete")
    assert hashlib.sha256(second.cached().read_bytes()).hexdigest() == swarm.blob.digest.hex
