"""The node-facing Peer: the origin's path, chunk torrents in one session, eviction of seeded
blobs, and the whole-digest check."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from common.certs import CertificateAuthority, new_ca
from common.chunks import plan
from peer.cache import DigestMismatch
from peer.config import PeerConfig
from peer.engine import ChunkedBlob, Peer
from peer.session import PeerError, Session, load_chunk
from tests.peer.swarm import Blob, MiB, Swarm, blob_of, cached_bytes, chunk_metainfo, credentials, make_blob


def config(tmp_path: Path, name: str, ip: str, **extra: int) -> PeerConfig:
    return PeerConfig(cache_dir=tmp_path / name, peer_listen=f"{ip}:0", **extra)


async def originate(blob: ChunkedBlob, data: bytes, ca: CertificateAuthority, index: int) -> bytes:
    """What an origin does with a chunk it fetched: write it in place, make its torrent, seed it."""
    chunk = blob.chunks[index]
    blob.chunk_file(index).write_bytes(data[chunk.start : chunk.end])
    metainfo = await blob.make_metainfo(index, ca.cert_pem)
    await blob.seed(index, metainfo)
    return metainfo


async def test_origin_publishes_each_chunk_and_seeds_them(tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 9 * MiB - 12345, seed=3)  # the last chunk not a whole number of pieces
    swarm = Swarm(tmp_path, blob, chunk_size=4 * MiB)
    async with Peer(config(tmp_path, "origin", "127.0.0.10")) as origin:
        chunked = await origin.open(blob.digest, blob.size, swarm.chunk_size, swarm.credentials("origin"))
        assert await origin.open(blob.digest, blob.size, swarm.chunk_size, swarm.credentials("x")) is chunked
        for chunk in swarm.chunks:
            # deterministic: any origin of a chunk publishes the same torrent
            assert await originate(chunked, blob.data, swarm.ca, chunk.index) == swarm.metainfo[chunk.index]
        await asyncio.wait_for(chunked.completed(), 30)
        assert chunked.complete() and chunked.left() == 0
        assert [(s.digest, s.chunk) for s in origin.status()] == [(str(blob.digest), i) for i in range(3)]
        leecher = await swarm.start(
            swarm.job("leecher", "127.0.0.11", "fetch", connect=[f"127.0.0.10:{origin.port}"])
        )
        await leecher.event("complete")
        assert leecher.cached() == blob.data
        await swarm.close()


async def test_chunks_with_the_same_bytes_are_different_torrents(tmp_path: Path) -> None:
    """Chunk torrents differ by index, so two chunks of equal bytes share one session."""
    half = make_blob(tmp_path, MiB, seed=6).data
    blob = blob_of(tmp_path, half + half, "twice")
    ca = new_ca("swarm")
    async with (
        Peer(config(tmp_path, "seeder", "127.0.0.16")) as seeder,
        Peer(config(tmp_path, "leecher", "127.0.0.17")) as leecher,
    ):
        source = await seeder.open(blob.digest, blob.size, MiB, credentials(ca, blob.digest, "seeder"))
        metainfo = [await originate(source, blob.data, ca, index) for index in (0, 1)]
        assert metainfo[0] != metainfo[1]
        sink = await leecher.open(blob.digest, blob.size, MiB, credentials(ca, blob.digest, "leecher"))
        first = await sink.leech(0, metainfo[0])
        sink.connect("127.0.0.16", seeder.port)  # remembered: chunk 1's torrent dials it when added
        second = await sink.leech(1, metainfo[1])
        assert first.info_hash != second.info_hash
        await asyncio.wait_for(sink.completed(), 30)
        assert cached_bytes(tmp_path / "leecher", blob.digest) == blob.data


async def test_a_chunk_metainfo_must_be_that_chunk(tmp_path: Path) -> None:
    blob, other = make_blob(tmp_path, 3 * MiB, seed=8), make_blob(tmp_path, 3 * MiB, seed=9)
    ca = new_ca("swarm")
    chunks = plan(blob.size, 2 * MiB)
    async with Peer(config(tmp_path, "node", "127.0.0.18")) as peer:
        chunked = await peer.open(blob.digest, blob.size, 2 * MiB, credentials(ca, blob.digest, "node"))
        wrong = {
            "another blob's name": chunk_metainfo(tmp_path, other, chunks[0], ca),
            "another chunk's index": chunk_metainfo(tmp_path, blob, chunks[1], ca),
            "no metainfo": b"d4:infoi1ee",
        }
        for why, metainfo in wrong.items():
            with pytest.raises(PeerError):
                await chunked.leech(0, metainfo)
            assert chunked.torrent(0) is None, why
        with pytest.raises(PeerError):
            await chunked.leech(2, chunk_metainfo(tmp_path, blob, chunks[1], ca))  # no chunk 2
        with pytest.raises(PeerError):
            await peer.open(other.digest, other.size, 3 * MiB, credentials(ca, other.digest, "node"))


async def test_a_withdrawn_chunk_and_a_dropped_blob_leave_nothing_behind(tmp_path: Path) -> None:
    ca = new_ca("swarm")
    partial, cached = make_blob(tmp_path, 2 * MiB, seed=10), make_blob(tmp_path, MiB, seed=11)
    async with Peer(config(tmp_path, "node", "127.0.0.19")) as peer:
        blob = await peer.open(partial.digest, partial.size, MiB, credentials(ca, partial.digest, "node"))
        await originate(blob, partial.data, ca, 0)
        await blob.drop_chunk(0)
        assert blob.torrent(0) is None and not blob.chunk_file(0).exists()
        assert blob.left() == partial.size
        await originate(blob, partial.data, ca, 0)  # the chunk can come again
        await peer.drop(partial.digest)
        with pytest.raises(PeerError):
            await blob.completed()
        assert peer.get(partial.digest) is None and partial.digest not in peer.cache
        assert not (tmp_path / "node" / "chunks" / partial.digest.hex).exists()
        await cache_and_seed(peer, cached, ca, 0)
        await peer.drop(cached.digest)
        assert peer.get(cached.digest) is None and peer.status() == []
        assert cached_bytes(tmp_path / "node", cached.digest) == cached.data  # still cached
        assert not (tmp_path / "node" / "torrents" / cached.digest.hex).exists()  # not seeded again


async def test_the_session_refuses_a_torrent_it_has(tmp_path: Path) -> None:
    blob = make_blob(tmp_path, MiB, seed=12)
    ca = new_ca("swarm")
    chunk = plan(blob.size, MiB)[0]
    metainfo = chunk_metainfo(tmp_path, blob, chunk, ca)
    creds = credentials(ca, blob.digest, "node")
    async with Session(config(tmp_path, "node", "127.0.0.20")) as session:
        await session.add(
            load_chunk(metainfo, blob.digest, chunk), blob.path, creds.cert_pem, creds.key_pem, seed=True
        )
        with pytest.raises(PeerError, match="already in the session"):
            await session.add(
                load_chunk(metainfo, blob.digest, chunk), blob.path, creds.cert_pem, creds.key_pem, seed=True
            )


async def test_eviction_stops_seeding_and_spares_pinned_blobs(tmp_path: Path) -> None:
    ca = new_ca("swarm")
    blobs = [make_blob(tmp_path, MiB, seed=n) for n in range(4)]
    async with Peer(config(tmp_path, "node", "127.0.0.12", cache_max_bytes=int(2.5 * MiB))) as peer:
        for age, blob in enumerate(blobs[:2]):
            await cache_and_seed(peer, blob, ca, age)
        with peer.cache.pin(blobs[0].digest):  # the oldest, being served
            await cache_and_seed(peer, blobs[2], ca, 2)
        assert [blob.digest in peer.cache for blob in blobs[:3]] == [True, False, True]
        assert peer.get(blobs[1].digest) is None  # no longer seeded
        assert not (tmp_path / "node" / "torrents" / blobs[1].digest.hex).exists()
        assert not (tmp_path / "node" / "chunks" / blobs[1].digest.hex).exists()
        await cache_and_seed(peer, blobs[3], ca, 3)
        # Serving it made blob 0 the most recently used: blob 2 (older on disk) goes.
        assert [blob.digest in peer.cache for blob in blobs] == [True, False, False, True]


async def cache_and_seed(peer: Peer, blob: Blob, ca: CertificateAuthority, age: int) -> None:
    chunked = await peer.open(blob.digest, blob.size, MiB, credentials(ca, blob.digest, "node"))
    await originate(chunked, blob.data, ca, 0)
    await asyncio.wait_for(chunked.completed(), 30)
    os.utime(peer.cache.marker(blob.digest), (1000 + age, 1000 + age))  # the blob's last use
    await peer.evict()  # as the peer does by itself once a blob is cached; here after the utime


async def test_chunks_that_do_not_make_the_digest_never_enter_the_cache(tmp_path: Path) -> None:
    """Two liars seed a blob's chunks swapped: every piece of each chunk torrent verifies, the
    whole blob does not."""
    data = make_blob(tmp_path, 2 * MiB, seed=4).data
    real = blob_of(tmp_path, data, "real")
    swapped = blob_of(tmp_path, data[MiB:] + data[:MiB], "swapped")
    ca = new_ca("swarm")
    forged = [forge(tmp_path, swapped, real, index, ca) for index in (0, 1)]
    async with (
        Peer(config(tmp_path, "liar0", "127.0.0.13")) as liar0,
        Peer(config(tmp_path, "liar1", "127.0.0.15")) as liar1,
        Peer(config(tmp_path, "victim", "127.0.0.14")) as victim,
    ):
        for index, liar in enumerate((liar0, liar1)):  # each holds one chunk: it never checks the blob
            lie = await liar.open(real.digest, real.size, MiB, credentials(ca, real.digest, "liar"))
            lie.chunk_file(index).write_bytes(swapped.data[index * MiB : (index + 1) * MiB])
            await lie.seed(index, forged[index])
        download = await victim.open(real.digest, real.size, MiB, credentials(ca, real.digest, "victim"))
        for index in (0, 1):
            await download.leech(index, forged[index])
        download.connect("127.0.0.13", liar0.port)
        download.connect("127.0.0.15", liar1.port)
        with pytest.raises(DigestMismatch):
            await asyncio.wait_for(download.completed(), 30)
        assert real.digest not in victim.cache
        assert victim.get(real.digest) is None
        assert not any((tmp_path / "victim" / "chunks").iterdir())
        assert not any((tmp_path / "victim" / "torrents").iterdir())


def forge(folder: Path, bytes_of: Blob, named: Blob, index: int, ca: CertificateAuthority) -> bytes:
    """Chunk `index` of `bytes_of`, as a torrent for chunk `index` of `named`."""
    return chunk_metainfo(
        folder, Blob(bytes_of.path, named.digest, bytes_of.data), plan(named.size, MiB)[index], ca
    )


async def test_a_taken_port_fails_at_start(tmp_path: Path) -> None:
    async with Peer(config(tmp_path, "first", "127.0.0.15")) as first:
        taken = PeerConfig(cache_dir=tmp_path / "second", peer_listen=f"127.0.0.15:{first.port}")
        with pytest.raises(PeerError, match="cannot listen"):
            async with Peer(taken):
                pass
