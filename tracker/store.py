"""Where the tracker keeps swarm state: a four-method Protocol, SQLite and Redis behind it.

Blob states (chunk torrents, leases, bars, active joiners) are durable in both. Peers are soft state
that announces rebuild within one interval: kept in memory beside SQLite, in Redis hashes when
replicas share; one entry per member, so an announce changes no other member's entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from common.ids import Digest, InfoHash
from tracker.swarm import BlobState, Peer, SwarmView, displaced, view_swarm

T = TypeVar("T")
Change = Callable[[BlobState], tuple[T, BlobState]]


class Store(Protocol):
    async def update_blob(self, digest: Digest, change: Change[T]) -> T:
        """Apply `change` to the blob's state atomically, across replicas too; return its result.
        A change that returns an equal state writes nothing."""

    async def blob_version(self, digest: Digest) -> int:
        """A number that changes whenever the blob's state is written, by any replica: what a
        long-poll reads four times a second instead of the whole state."""

    async def announce(
        self, info_hash: InfoHash, peer: Peer, stopped: bool, numwant: int, per_address: int, now: float
    ) -> SwarmView:
        """Record the peer, dropping the entries it `displaced` (or with `stopped`, drop its own
        entry), and return the swarm as it sees it."""

    async def scrape(self, info_hash: InfoHash, now: float) -> SwarmView: ...


class MemoryPeers:
    """Peers of every swarm, in this process, pruned as announces come in."""

    def __init__(self) -> None:
        self._swarms: dict[bytes, dict[str, Peer]] = {}

    def announce(
        self, info_hash: InfoHash, peer: Peer, stopped: bool, numwant: int, per_address: int, now: float
    ) -> SwarmView:
        swarm = self._swarms.setdefault(info_hash.raw, {})
        gone = [m for m, p in swarm.items() if p.expires_at <= now]
        gone += [peer.member] if stopped else displaced(swarm.values(), peer, per_address)
        for member in gone:
            swarm.pop(member, None)
        if not stopped:
            swarm[peer.member] = peer
        if not swarm:
            del self._swarms[info_hash.raw]
        return view_swarm(swarm.values(), peer.member, peer.seeding, numwant, now)

    def scrape(self, info_hash: InfoHash, now: float) -> SwarmView:
        return view_swarm(self._swarms.get(info_hash.raw, {}).values(), "", False, 0, now)


class SqliteStore:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS blobs (digest TEXT PRIMARY KEY, state TEXT)")
        self._lock = asyncio.Lock()
        self._peers = MemoryPeers()
        # Only this process writes the file (replicas share Redis, never SQLite), so versions
        # counted in memory see every write.
        self._versions: dict[Digest, int] = {}

    async def update_blob(self, digest: Digest, change: Change[T]) -> T:
        async with self._lock:
            old = BlobState.from_json(await asyncio.to_thread(self._read, str(digest)))
            result, new = change(old)
            if new != old:
                await asyncio.to_thread(self._write, str(digest), new.to_json())
                self._versions[digest] = self._versions.get(digest, 0) + 1
            return result

    async def blob_version(self, digest: Digest) -> int:
        return self._versions.get(digest, 0)

    def _read(self, digest: str) -> str | None:
        row = self._db.execute("SELECT state FROM blobs WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else str(row[0])

    def _write(self, digest: str, state: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO blobs (digest, state) VALUES (?, ?)", (digest, state))

    async def announce(
        self, info_hash: InfoHash, peer: Peer, stopped: bool, numwant: int, per_address: int, now: float
    ) -> SwarmView:
        return self._peers.announce(info_hash, peer, stopped, numwant, per_address, now)

    async def scrape(self, info_hash: InfoHash, now: float) -> SwarmView:
        return self._peers.scrape(info_hash, now)

    def close(self) -> None:
        self._db.close()


class RedisStore:
    """State shared by tracker replicas. Keys: `shoal:blob:<digest>` (JSON state),
    `shoal:blobversion:<digest>` (counter bumped with each write), `shoal:members:<info-hash>`
    (a hash of peer entries by member; the node-keyed `shoal:peers:*` of older trackers expire on
    their own within two announce intervals)."""

    def __init__(self, url: str):
        import redis.asyncio as redis  # optional dependency: shoal[redis]

        self._redis = redis.Redis.from_url(url)
        self._watch_error = redis.WatchError

    async def update_blob(self, digest: Digest, change: Change[T]) -> T:
        key = f"shoal:blob:{digest}"
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    old = BlobState.from_json(await pipe.get(key))
                    result, new = change(old)
                    if new == old:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return result
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, new.to_json())
                    pipe.incr(f"shoal:blobversion:{digest}")
                    await pipe.execute()
                    return result
                except self._watch_error:
                    continue  # another replica changed it first: decide again on its state

    async def blob_version(self, digest: Digest) -> int:
        return int(await self._redis.get(f"shoal:blobversion:{digest}") or 0)

    async def announce(
        self, info_hash: InfoHash, peer: Peer, stopped: bool, numwant: int, per_address: int, now: float
    ) -> SwarmView:
        """Two replicas announcing peers of one address at once may each keep the other's entry:
        the next announce from that address drops the excess."""
        key = f"shoal:members:{info_hash.hex}"
        async with self._redis.pipeline(transaction=False) as pipe:
            if stopped:
                pipe.hdel(key, peer.member)
            else:
                pipe.hset(key, peer.member, _encode_peer(peer))
                pipe.expireat(key, int(peer.expires_at) + 1)
            pipe.hgetall(key)
            *_, raw = await pipe.execute()
        peers = list(_decode_peers(raw))
        gone = {p.member for p in peers if p.expires_at <= now}
        if not stopped:
            gone.update(displaced(peers, peer, per_address))
        if gone:
            await self._redis.hdel(key, *gone)
            peers = [p for p in peers if p.member not in gone]
        return view_swarm(peers, peer.member, peer.seeding, numwant, now)

    async def scrape(self, info_hash: InfoHash, now: float) -> SwarmView:
        raw = await self._redis.hgetall(f"shoal:members:{info_hash.hex}")
        return view_swarm(_decode_peers(raw), "", False, 0, now)

    async def close(self) -> None:
        await self._redis.aclose()


def _encode_peer(peer: Peer) -> str:
    return f"{peer.ip}|{peer.port}|{int(peer.seeding)}|{peer.expires_at}|{peer.uploaded}"


def _decode_peers(raw: dict[Any, Any]) -> Iterable[Peer]:
    for member, value in raw.items():
        ip, port, seeding, expires_at, uploaded = value.decode().split("|")
        yield Peer(member.decode(), ip, int(port), seeding == "1", float(expires_at), int(uploaded))


@contextlib.asynccontextmanager
async def open_store(spec: str, state_dir: Path) -> AsyncIterator[Store]:
    if spec == "sqlite":
        sqlite_store = SqliteStore(state_dir / "tracker.sqlite3")
        try:
            yield sqlite_store
        finally:
            sqlite_store.close()
    else:
        redis_store = RedisStore(spec)
        try:
            yield redis_store
        finally:
            await redis_store.close()
