"""In-process coordination per blob: wake-ups for long-polls, one report check at a time.

Both only shorten or deduplicate work inside one tracker process; replicas see each other's changes
through the store (`Store.blob_version`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from common.ids import Digest


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
    """Chunks coming from each registry at once, over all its blobs, as this process last wrote
    them: a blob's leases are in its own state, and no join should read every other blob's to
    learn how busy their registry is. With replicas each sees its own writes, so the bound is per
    replica; a lease counts until it expires unless a later write of its blob drops it."""

    def __init__(self) -> None:
        self._fetching: dict[str, dict[Digest, list[float]]] = {}  # registry -> blob -> expiries

    def note(self, digest: Digest, registry: str | None, expiries: list[float]) -> None:
        """The leases of `digest` still fetching, by when each expires; blobs with none are forgotten."""
        if registry is None:
            return
        blobs = self._fetching.setdefault(registry, {})
        if expiries:
            blobs[digest] = expiries
        else:
            blobs.pop(digest, None)
            if not blobs:
                del self._fetching[registry]

    def elsewhere(self, digest: Digest, registry: str | None, now: float) -> int:
        """Chunks of the registry's other blobs coming from it now."""
        blobs = self._fetching.get(registry or "", {})
        return sum(sum(t > now for t in expiries) for blob, expiries in blobs.items() if blob != digest)

    def neighbours(self, digest: Digest, registry: str | None) -> list[Digest]:
        """The registry's other blobs with chunks in flight: a freed slot may be theirs."""
        return [blob for blob in self._fetching.get(registry or "", {}) if blob != digest]
