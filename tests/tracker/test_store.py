"""One conformance suite every tracker store must pass: SQLite, and Redis on a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from common.ids import Digest, InfoHash
from tests.tracker.harness import redis_server
from tracker.store import Store, open_store
from tracker.swarm import BlobState, Decision, Peer, Role, decide_join

BLOB = Digest("c" * 64)
HASH = InfoHash(b"\x07" * 20)


@pytest_asyncio.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        async with open_store("sqlite", tmp_path) as sqlite:
            yield sqlite
    else:
        with redis_server(tmp_path) as url:
            async with open_store(url, tmp_path) as redis:
                yield redis


async def test_concurrent_joins_make_exactly_one_origin(store: Store) -> None:
    def joiner(node: str) -> object:
        def change(state: BlobState) -> tuple[Decision, BlobState]:
            return decide_join(state, node, 10, f"token-{node}", now=0, lease_seconds=60)

        return store.update_blob(BLOB, change)

    decisions = await asyncio.gather(*(joiner(f"n{i}") for i in range(20)))  # type: ignore[arg-type]
    assert sorted(d.role for d in decisions) == [Role.ORIGIN] + [Role.WAIT] * 19


async def test_blob_state_is_kept(store: Store) -> None:
    state = BlobState(size=5, torrent=b"meta", info_hash="ab" * 20, publisher="n1", barred=frozenset({"x"}))
    await store.update_blob(BLOB, lambda _: (None, state))
    assert await store.update_blob(BLOB, lambda s: (s, s)) == state
    assert await store.update_blob(Digest("d" * 64), lambda s: (s, s)) == BlobState()


async def test_announce_tracks_peers_and_expiry(store: Store) -> None:
    now = time.time()  # Redis expires keys by the wall clock
    seeder = Peer("seed", "10.0.0.1", 1, True, expires_at=now + 100)
    leecher = Peer("leech", "10.0.0.2", 2, False, expires_at=now + 100)
    await store.announce(HASH, seeder, stopped=False, numwant=50, now=now)
    view = await store.announce(HASH, leecher, stopped=False, numwant=50, now=now)
    assert view.peers == [seeder] and (view.complete, view.incomplete) == (1, 1)
    assert (await store.scrape(HASH, now=now)).complete == 1
    await store.announce(HASH, leecher, stopped=True, numwant=50, now=now + 1)
    assert (await store.scrape(HASH, now=now + 1)).incomplete == 0
    assert (await store.scrape(HASH, now=now + 100)).complete == 0  # expired


async def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    state = BlobState(size=5, torrent=b"meta", info_hash="ab" * 20, publisher="n1")
    async with open_store("sqlite", tmp_path) as first:
        await first.update_blob(BLOB, lambda _: (None, state))
    async with open_store("sqlite", tmp_path) as second:
        assert await second.update_blob(BLOB, lambda s: (s, s)) == state
