"""One conformance suite every tracker store must pass: SQLite, and Redis on a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from common.ids import Digest, InfoHash
from tests.tracker.harness import redis_server
from tracker.store import Store, open_store
from tracker.swarm import (
    BlobState,
    ChunkState,
    Lease,
    Peer,
    Rules,
    SwarmView,
    Torrent,
    Visit,
    start,
    visit,
)

BLOB = Digest("c" * 64)
HASH = InfoHash(b"\x07" * 20)
RULES = Rules(
    lease_seconds=60, chunks_in_flight=2, announce_interval=30, lone_grace=1, registry_in_flight=100
)
STATE = BlobState(
    size=3 * 2**20 + 5,
    chunk_size=2**20,
    chunks=(
        ChunkState(torrent=Torrent(b"\x00meta", "ab" * 20, "n1~k1", 12.5), verified=True),
        ChunkState(lease=Lease("n2~k2", "tok", 99.5, 1234)),
        ChunkState(barred=frozenset({"x", "y"})),
        ChunkState(),
    ),
    joiners={"n1~k1": 10.0, "n2~k2": 11.25},
)


@pytest_asyncio.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        async with open_store("sqlite", tmp_path) as sqlite:
            yield sqlite
    else:
        with redis_server(tmp_path) as url:
            async with open_store(url, tmp_path) as redis:
                yield redis


async def test_concurrent_joins_never_lease_more_than_chunks_in_flight(store: Store) -> None:
    alive = SwarmView([], 1, 0)

    def joiner(node: str) -> Awaitable[Visit]:
        tokens = iter(f"{node}-{i}" for i in range(10))

        def change(state: BlobState) -> tuple[Visit, BlobState]:
            return visit(start(state, 4 * 2**20, 2**20), node, 0, RULES, alive, lambda: next(tokens))

        return store.update_blob(BLOB, change)

    visits = await asyncio.gather(*(joiner(f"n{i}") for i in range(20)))
    granted = sorted(index for v in visits for index in v.granted)
    assert granted == [0, 1]
    state = await store.update_blob(BLOB, lambda s: (s, s))
    assert len(state.joiners) == 20
    assert sorted(i for i, c in enumerate(state.chunks) if c.lease is not None) == [0, 1]


async def test_blob_state_is_kept(store: Store) -> None:
    await store.update_blob(BLOB, lambda _: (None, STATE))
    assert await store.update_blob(BLOB, lambda s: (s, s)) == STATE
    assert await store.update_blob(Digest("d" * 64), lambda s: (s, s)) == BlobState()


async def test_version_changes_with_every_write_and_only_then(store: Store) -> None:
    before = await store.blob_version(BLOB)
    await store.update_blob(BLOB, lambda _: (None, STATE))
    written = await store.blob_version(BLOB)
    assert written != before
    await store.update_blob(BLOB, lambda s: (None, s))
    assert await store.blob_version(BLOB) == written
    await store.update_blob(BLOB, lambda s: (None, replace(s, joiners={})))
    assert await store.blob_version(BLOB) != written


async def test_announce_tracks_peers_and_expiry(store: Store) -> None:
    now = time.time()  # Redis expires keys by the wall clock
    seeder = Peer("seed", "10.0.0.1", 1, True, expires_at=now + 100, uploaded=5)
    leecher = Peer("leech", "10.0.0.2", 2, False, expires_at=now + 100)
    await store.announce(HASH, seeder, stopped=False, numwant=50, per_address=4, now=now)
    view = await store.announce(HASH, leecher, stopped=False, numwant=50, per_address=4, now=now)
    assert view.peers == [seeder] and (view.complete, view.incomplete) == (1, 1)
    assert (await store.scrape(HASH, now=now)).complete == 1
    await store.announce(HASH, leecher, stopped=True, numwant=50, per_address=4, now=now + 1)
    assert (await store.scrape(HASH, now=now + 1)).incomplete == 0
    assert (await store.scrape(HASH, now=now + 100)).complete == 0  # expired


async def test_an_announce_changes_only_its_own_members_entry(store: Store) -> None:
    now = time.time()
    honest = Peer("node-1~key-a", "10.0.0.1", 6881, True, expires_at=now + 100)
    impostor = Peer("node-1~key-b", "10.0.0.2", 6881, False, expires_at=now + 100)
    await store.announce(HASH, honest, stopped=False, numwant=50, per_address=4, now=now)
    view = await store.announce(HASH, impostor, stopped=False, numwant=50, per_address=4, now=now)
    assert view.peers == [honest]  # listed beside it, not in its place
    await store.announce(HASH, impostor, stopped=True, numwant=50, per_address=4, now=now)
    assert (await store.scrape(HASH, now=now)).complete == 1  # its stop dropped its own entry only


async def test_one_address_holds_at_most_per_address_entries(store: Store) -> None:
    now = time.time()
    honest = Peer("honest~key", "10.0.0.9", 6881, False, expires_at=now + 100)
    await store.announce(HASH, honest, stopped=False, numwant=50, per_address=4, now=now)
    for i in range(150):
        sybil = Peer(f"sybil-{i}~key", "10.0.0.66", 7000 + i, False, expires_at=now + 100 + i)
        view = await store.announce(HASH, sybil, stopped=False, numwant=200, per_address=4, now=now)
    assert sorted(p.member for p in view.peers) == ["honest~key", "sybil-146~key", "sybil-147~key",
                                                    "sybil-148~key"]  # fmt: skip
    assert (await store.scrape(HASH, now=now)).incomplete == 5


async def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    async with open_store("sqlite", tmp_path) as first:
        await first.update_blob(BLOB, lambda _: (None, STATE))
    async with open_store("sqlite", tmp_path) as second:
        assert await second.update_blob(BLOB, lambda s: (s, s)) == STATE
