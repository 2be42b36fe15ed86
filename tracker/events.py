"""In-process coordination per blob: wake-ups for long-polls, one report check at a time.

Both only shorten or deduplicate work inside one tracker process; replicas see each other's changes
through the store (`Store.blob_version`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from common.ids import Digest
from tracker.swarm import ACTIVE_JOINER_SECONDS, BlobState, Elsewhere, Lease, node_of

# Longer than a long-poll: a blob whose nodes all wait in `sync` is still being fetched.
ACTIVE_SECONDS = ACTIVE_JOINER_SECONDS


class BlobEvents:
    """`notify(digest)` wakes every `wait(digest)` in progress; `close()` wakes them all for good."""

    def __init__(self) -> None:
        self._waiters: dict[Digest, set[asyncio.Future[None]]] = {}
        self.closed = False

    def notify(self, digest: Digest) -> None:
        for waiter in self._waiters.get(digest, ()):
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """The server is stopping: long-polls answer now instead of holding the stop up."""
        self.closed = True
        for digest in list(self._waiters):
            self.notify(digest)

    async def wait(self, digest: Digest, timeout: float) -> bool:
        """Whether a notification came within `timeout` seconds."""
        if self.closed:
            return False
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(digest, set())
        waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[digest]


class BlobLocks:
    """One holder per blob at a time; a lock lives only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Digest, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, digest: Digest) -> AsyncIterator[None]:
        lock, users = self._locks.get(digest, (asyncio.Lock(), 0))
        self._locks[digest] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[digest]
            if users == 1:
                del self._locks[digest]
            else:
                self._locks[digest] = (lock, users - 1)


class RegistryLoad:
    """What each registry is busy with, over all its blobs, as this process last wrote them: a
    blob's leases are in its own state, and no join should read every other blob's to learn how
    busy their registry is. With replicas each sees its own writes, so the bounds are per replica.
    A lease counts until it expires unless a later write of its blob drops it; a blob counts as
    being fetched while it has unpublished chunks and was written in the last `ACTIVE_SECONDS`."""

    def __init__(self) -> None:
        self._blobs: dict[
            str, dict[Digest, tuple[float, list[Lease]]]
        ] = {}  # registry -> blob -> (written, fetching)

    def note(self, digest: Digest, state: BlobState, now: float) -> None:
        if state.registry is None:  # a state from before blobs named their registry
            return
        blobs = self._blobs.setdefault(state.registry, {})
        if all(chunk.torrent is not None for chunk in state.chunks):
            blobs.pop(digest, None)
        else:
            blobs[digest] = (now, state.fetching())
        for blob, (written, _) in list(blobs.items()):
            if written <= now - ACTIVE_SECONDS:
                del blobs[blob]
        if not blobs:
            del self._blobs[state.registry]

    def elsewhere(self, digest: Digest, registry: str | None, now: float) -> Elsewhere:
        """The registry's work on blobs other than `digest`."""
        others = [
            (written, leases)
            for blob, (written, leases) in self._blobs.get(registry or "", {}).items()
            if blob != digest and written > now - ACTIVE_SECONDS
        ]
        live = [lease for _, leases in others for lease in leases if lease.expires_at > now]
        nodes: dict[str, float] = {}
        for lease in live:
            node = node_of(lease.member)
            nodes[node] = max(nodes.get(node, 0.0), lease.granted_at)
        idle = sum(not any(lease.expires_at > now for lease in leases) for _, leases in others)
        return Elsewhere(len(live), idle, nodes)

    def neighbours(self, digest: Digest, registry: str | None) -> list[Digest]:
        """The registry's other blobs being fetched: a freed slot may be theirs."""
        return [blob for blob in self._blobs.get(registry or "", {}) if blob != digest]
