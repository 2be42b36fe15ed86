"""The node's peer: a libtorrent session plus the blob cache, as one async context manager.

The node daemon's whole interface to BitTorrent:

    async with Peer(config) as peer:
        blob = await peer.fetch(digest, metainfo, credentials)      # leecher
        async for chunk in blob.stream(start, end, fallback):       # in order, registry on stall
            ...
        await peer.commit(digest, file); await peer.seed(...)       # origin
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from common.ids import Digest
from common.tasks import spawn
from peer.cache import BlobCache, Credentials, SeedRecord
from peer.config import PeerConfig
from peer.session import PeerError, Session, Status, Torrent
from peer.stream import Fallback, stream
from peer.torrent import make_metainfo, piece_size_for

logger = logging.getLogger(__name__)

# How often seeding torrents are checked for an expired certificate.
HOUSEKEEPING_INTERVAL = 30.0


class Blob:
    """One blob's torrent in the session: stream it, wait for it to be complete in the cache."""

    def __init__(self, peer: Peer, digest: Digest, torrent: Torrent, credentials: Credentials) -> None:
        self.digest = digest
        self.torrent = torrent
        self.size = torrent.size
        self.announce = credentials.announce
        self.not_after = credentials.not_after
        self._peer = peer
        self._complete: asyncio.Future[Path] = asyncio.get_running_loop().create_future()

    def _fail(self, error: Exception) -> None:
        if not self._complete.done():
            self._complete.set_exception(error)
            self._complete.exception()  # marked retrieved: nobody need be waiting

    async def complete(self) -> Path:
        """The blob's path in the cache once complete and verified; raises `DigestMismatch` or
        `PeerError` when it cannot be."""
        return await asyncio.shield(self._complete)

    async def stream(
        self, start: int = 0, end: int | None = None, fallback: Fallback | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes [start, end) in order as pieces verify; see `peer.stream.stream`."""
        config = self._peer.config
        end = self.size if end is None else min(end, self.size)
        with self._peer.cache.pin(self.digest):
            async for chunk in stream(
                self.torrent,
                start,
                end,
                window=config.stream_window,
                stall_timeout=config.stall_timeout,
                fallback=fallback,
            ):
                yield chunk

    def connect(self, host: str, port: int) -> None:
        """Dial a peer (dialled on libtorrent's one-second tick): the node's announcer dials the
        peers the tracker names; libtorrent itself talks to no tracker."""
        self.torrent.connect(host, port)


class Peer:
    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.cache = BlobCache(config.cache_dir, config.cache_max_bytes)
        self._session = Session(config)
        self._blobs: dict[Digest, Blob] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Peer:
        await self._session.__aenter__()
        try:
            for record in await asyncio.to_thread(self.cache.seeds):
                await self._reseed(record)
        except BaseException:
            await self._session.__aexit__(None, None, None)
            raise
        self._housekeeping = spawn(self._keep_house(), name="peer-housekeeping")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tasks = [*self._finishing, *([self._housekeeping] if self._housekeeping else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for blob in self._blobs.values():
            blob._fail(PeerError("peer stopped"))
        self._blobs.clear()
        await self._session.__aexit__(kind, exc, tb)

    @property
    def port(self) -> int:
        return self._session.port

    def blobs(self) -> list[Blob]:
        return list(self._blobs.values())

    def get(self, digest: Digest) -> Blob | None:
        return self._blobs.get(digest)

    def status(self) -> list[Status]:
        return [blob.torrent.status() for blob in self._blobs.values()]

    async def fetch(self, digest: Digest, metainfo: bytes, credentials: Credentials) -> Blob:
        """Join a blob's swarm as a leecher; the blob enters the cache when complete and verified."""
        if blob := self._blobs.get(digest):
            return blob
        if digest in self.cache:
            return await self.seed(digest, metainfo, credentials)
        partial = self.cache.partial_path(digest)
        blob = await self._add(digest, metainfo, credentials, partial, seed=False)
        task = spawn(self._finish(blob, partial), name=f"finish-{digest.hex[:12]}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        return blob

    async def seed(
        self, digest: Digest, metainfo: bytes, credentials: Credentials, *, check: bool = False
    ) -> Blob:
        """Seed a blob that is in the cache, until its certificate expires or it is evicted.

        Each piece is verified the first time a peer asks for it; `check` verifies them all first.
        """
        if blob := self._blobs.get(digest):
            return blob
        if digest not in self.cache:
            raise KeyError(f"{digest} is not in the cache")
        blob = await self._add(digest, metainfo, credentials, self.cache.path(digest), seed=not check)
        blob._complete.set_result(self.cache.path(digest))
        return blob

    async def commit(self, digest: Digest, file: Path) -> Path:
        """Move a blob fetched elsewhere (the origin's download) into the cache, if its digest
        matches; raises `DigestMismatch` (and leaves `file` alone) when it does not."""
        path = await asyncio.to_thread(self.cache.commit, digest, file)
        await self.evict()
        return path

    async def make_metainfo(self, digest: Digest, ca_pem: bytes) -> bytes:
        """The torrent of a cached blob, for the origin to publish."""
        path = self.cache.path(digest)
        size = path.stat().st_size
        return await asyncio.to_thread(make_metainfo, path, digest, ca_pem, piece_size_for(size))

    async def drop(self, digest: Digest) -> None:
        """Stop seeding or fetching a blob; a cached blob stays in the cache."""
        blob = self._blobs.pop(digest, None)
        if blob is not None:
            await self._session.remove(blob.torrent)
        await asyncio.to_thread(self.cache.forget_seed, digest)

    async def evict(self) -> None:
        """Delete least recently used blobs beyond `cache_max_bytes`, never a pinned one."""
        for digest in self.cache.to_evict():
            await self.drop(digest)
            with contextlib.suppress(RuntimeError):  # pinned since the decision
                await asyncio.to_thread(self.cache.delete, digest)

    async def _reseed(self, record: SeedRecord) -> None:
        try:
            await self.seed(record.digest, record.metainfo, record.credentials)
        except PeerError as exc:
            logger.warning(
                "not seeding a cached blob", extra={"digest": str(record.digest), "error": str(exc)}
            )
            await asyncio.to_thread(self.cache.forget_seed, record.digest)

    async def _add(
        self, digest: Digest, metainfo: bytes, credentials: Credentials, file: Path, *, seed: bool
    ) -> Blob:
        record = SeedRecord(digest, metainfo, credentials)
        await asyncio.to_thread(self.cache.save_seed, record)
        try:
            torrent = await self._session.add(
                metainfo,
                file,
                credentials.cert_pem,
                credentials.key_pem,
                seed=seed,
            )
        except BaseException:
            await asyncio.to_thread(self.cache.forget_seed, digest)
            raise
        if torrent.name != digest.torrent_name:
            await self._session.remove(torrent)
            await asyncio.to_thread(self.cache.forget_seed, digest)
            raise PeerError(f"metainfo names {torrent.name}, not {digest.torrent_name}")
        blob = Blob(self, digest, torrent, credentials)
        self._blobs[digest] = blob
        return blob

    async def _finish(self, blob: Blob, partial: Path) -> None:
        """When the download completes: verify the whole blob, then rename it into the cache."""
        torrent = blob.torrent
        try:
            await torrent.wait_finished()
            await torrent.flush()  # every byte on disk before the file is hashed
            await asyncio.to_thread(self.cache.verify, blob.digest, partial)
            await torrent.rename(self.cache.path(blob.digest))  # atomic: seeding goes on from there
            await asyncio.to_thread(self.cache.entered, blob.digest)
        except Exception as exc:  # DigestMismatch, PeerError, OSError: the blob stays out
            logger.error("blob not cached", extra={"digest": str(blob.digest), "error": str(exc)})
            with contextlib.suppress(PeerError):
                await self._discard(blob, partial)
            blob._fail(exc)
            return
        blob._complete.set_result(self.cache.path(blob.digest))
        await self.evict()

    async def _discard(self, blob: Blob, partial: Path) -> None:
        if self._blobs.get(blob.digest) is blob:
            await self.drop(blob.digest)
        partial.unlink(missing_ok=True)

    async def _keep_house(self) -> None:
        """Stop seeding blobs whose certificate expired: no peer would accept it any more."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            for digest, blob in list(self._blobs.items()):
                if blob.not_after <= time.time():
                    logger.info("certificate expired; not seeding", extra={"digest": str(digest)})
                    await self.drop(digest)
