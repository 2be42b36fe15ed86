"""The node-facing Peer: the origin's path, eviction of seeded blobs, and the whole-digest check."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from common.certs import CertificateAuthority, new_ca
from peer.cache import DigestMismatch
from peer.config import PeerConfig
from peer.engine import Peer
from peer.session import PeerError
from peer.torrent import make_metainfo
from tests.peer.swarm import Blob, MiB, Swarm, credentials, make_blob


def config(tmp_path: Path, name: str, ip: str, **extra: int) -> PeerConfig:
    return PeerConfig(cache_dir=tmp_path / name, peer_listen=f"{ip}:0", **extra)  # type: ignore[arg-type]


async def test_origin_commits_publishes_and_seeds(tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 8 * MiB, seed=3)
    swarm = Swarm(tmp_path, blob)
    async with Peer(config(tmp_path, "origin", "127.0.0.10")) as origin:
        download = origin.cache.partial_path(blob.digest)
        download.write_bytes(blob.data)  # as the origin's registry fetch would
        await origin.commit(blob.digest, download)
        metainfo = await origin.make_metainfo(blob.digest, swarm.ca.cert_pem)
        assert metainfo == swarm.metainfo  # deterministic: any origin publishes the same torrent
        await origin.seed(blob.digest, metainfo, swarm.credentials("origin"))
        leecher = await swarm.start(
            swarm.job("leecher", "127.0.0.11", "fetch", connect=[f"127.0.0.10:{origin.port}"])
        )
        await leecher.event("complete")
        assert leecher.cached().read_bytes() == blob.data
        await swarm.close()


async def test_eviction_stops_seeding_and_spares_pinned_blobs(tmp_path: Path) -> None:
    ca = new_ca("swarm")
    blobs = [make_blob(tmp_path, MiB, seed=n) for n in range(4)]
    async with Peer(config(tmp_path, "node", "127.0.0.12", cache_max_bytes=int(2.5 * MiB))) as peer:
        for age, blob in enumerate(blobs[:2]):
            await commit_and_seed(peer, blob, ca, age)
        with peer.cache.pin(blobs[0].digest):  # the oldest, being served
            await commit_and_seed(peer, blobs[2], ca, 2)
        assert [blob.digest in peer.cache for blob in blobs[:3]] == [True, False, True]
        assert peer.get(blobs[1].digest) is None  # no longer seeded
        assert not list((tmp_path / "node" / "torrents").glob(f"{blobs[1].digest.hex}.*"))
        await commit_and_seed(peer, blobs[3], ca, 3)
        # Serving it made blob 0 the most recently used: blob 2 (older on disk) goes.
        assert [blob.digest in peer.cache for blob in blobs] == [True, False, False, True]


async def commit_and_seed(peer: Peer, blob: Blob, ca: CertificateAuthority, age: int) -> None:
    path = peer.cache.partial_path(blob.digest)
    path.write_bytes(blob.data)
    os.utime(path, (1000 + age, 1000 + age))  # rename keeps it: the blob's last use
    await peer.commit(blob.digest, path)
    metainfo = await asyncio.to_thread(
        make_metainfo, peer.cache.path(blob.digest), blob.digest, ca.cert_pem, 2**18
    )  # type: ignore[attr-defined]
    await peer.seed(blob.digest, metainfo, credentials(ca, blob.digest, "node"))  # type: ignore[arg-type]


async def test_bytes_that_miss_the_digest_never_enter_the_cache(tmp_path: Path) -> None:
    """A torrent named for blob A but made from other bytes: every piece verifies, the digest not."""
    real, other = make_blob(tmp_path, 2 * MiB, seed=4), make_blob(tmp_path, 2 * MiB, seed=5)
    ca = new_ca("swarm")
    forged = make_metainfo(other.path, real.digest, ca.cert_pem, 2**18)
    async with (
        Peer(config(tmp_path, "liar", "127.0.0.13")) as liar,
        Peer(config(tmp_path, "victim", "127.0.0.14")) as victim,
    ):
        liar.cache.path(real.digest).write_bytes(other.data)
        await liar.seed(real.digest, forged, credentials(ca, real.digest, "liar"))
        download = await victim.fetch(real.digest, forged, credentials(ca, real.digest, "victim"))
        download.connect("127.0.0.13", liar.port)
        with pytest.raises(DigestMismatch):
            await asyncio.wait_for(download.complete(), 30)
        assert real.digest not in victim.cache
        assert victim.get(real.digest) is None
        assert not any((tmp_path / "victim" / "partial").iterdir())


async def test_a_taken_port_fails_at_start(tmp_path: Path) -> None:
    async with Peer(config(tmp_path, "first", "127.0.0.15")) as first:
        taken = PeerConfig(cache_dir=tmp_path / "second", peer_listen=f"127.0.0.15:{first.port}")
        with pytest.raises(PeerError, match="cannot listen"):
            async with Peer(taken):
                pass
