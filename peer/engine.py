"""The node's peer: a libtorrent session plus the blob cache, as one async context manager.

The node daemon's whole interface to BitTorrent. A blob is a list of chunks (`common.chunks`),
each its own private SSL torrent, all named for the blob so that one blob-scoped certificate opens
every one of them; a `ChunkedBlob` holds a blob's chunk torrents:

    async with Peer(config) as peer:
        blob = await peer.open(digest, size, chunk_size, credentials)
        await blob.leech(index, metainfo)                          # a chunk someone published
        async for data in blob.stream(index, start, end, fallback):  # in order, registry on stall
            ...
        # this node is a chunk's origin: it writes blob.chunk_file(index) itself, then
        await blob.seed(index, await blob.make_metainfo(index, ca_pem))
        await blob.completed()  # every chunk finished, the whole digest matched, in the cache
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from common.chunks import Chunk, plan
from common.ids import Digest
from common.tasks import spawn
from peer.cache import BlobCache, Credentials, DigestMismatch, SeedRecord
from peer.config import PeerConfig
from peer.session import DiskError, PeerError, Session, Status, Torrent, load_chunk, on_disk
from peer.stream import Fallback, stream
from peer.torrent import make_chunk_metainfo, piece_size_for

logger = logging.getLogger(__name__)

# How often seeding torrents are checked for an expired certificate.
HOUSEKEEPING_INTERVAL = 30.0


class ChunkedBlob:
    """One blob's chunk torrents in the session; enters the cache once all are finished and the
    whole blob matches its digest. Chunks get their torrents in any order, whenever published."""

    def __init__(
        self, peer: Peer, digest: Digest, chunks: list[Chunk], chunk_size: int, credentials: Credentials
    ) -> None:
        self.digest = digest
        self.size = chunks[-1].end
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.announce = credentials.announce
        self.not_after = credentials.not_after
        self._peer = peer
        self._credentials = credentials
        self._torrents: dict[int, Torrent] = {}
        self._peers: set[tuple[str, int]] = set()  # every peer named for the blob, for later chunks
        self._added = asyncio.Event()
        self._lock = asyncio.Lock()  # one change of the torrent set at a time
        self._closed: PeerError | None = None
        self._commit: asyncio.Future[Path] | None = None
        self._completed: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._task = spawn(self._complete(), name=f"complete-{digest.hex[:12]}")

    def chunk_file(self, index: int) -> Path:
        """Where chunk `index` lives on disk, from its first byte on: an origin writes it there."""
        return self._peer.cache.chunk_path(self.digest, index)

    def torrent(self, index: int) -> Torrent | None:
        return self._torrents.get(index)

    def status(self) -> list[Status]:
        return [self._torrents[index].status() for index in sorted(self._torrents)]

    async def leech(self, index: int, metainfo: bytes) -> Torrent:
        """Add chunk `index`'s torrent over `chunk_file(index)`; libtorrent checks what is there
        already and fetches the rest from peers. A chunk that has a torrent keeps it."""
        return await self._add(index, metainfo, seed=False)

    async def seed(self, index: int, metainfo: bytes) -> Torrent:
        """Add chunk `index`'s torrent over its complete file (the origin's download) in seed mode."""
        return await self._add(index, metainfo, seed=True)

    async def make_metainfo(self, index: int, ca_pem: bytes) -> bytes:
        """Chunk `index`'s torrent, hashed from `chunk_file(index)`, for the origin to publish."""
        piece_size = piece_size_for(self.chunks[index].length)
        with on_disk("chunk_read"):
            return await asyncio.to_thread(
                make_chunk_metainfo, self.chunk_file(index), self.digest, index, ca_pem, piece_size
            )

    async def stream(
        self, index: int, start: int = 0, end: int | None = None, fallback: Fallback | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes [start, end) of chunk `index` (offsets in the chunk) in order as pieces verify;
        see `peer.stream.stream`. `fallback` is asked for chunk offsets too."""
        torrent = self._torrents.get(index)
        if torrent is None:
            raise PeerError(f"{self.digest} chunk {index}: no torrent")
        config = self._peer.config
        end = torrent.size if end is None else min(end, torrent.size)
        with self._peer.cache.pin(self.digest):
            async for data in stream(
                torrent,
                start,
                end,
                window=config.stream_window,
                stall_timeout=config.stall_timeout,
                fallback=fallback,
            ):
                yield data

    async def drop_chunk(self, index: int) -> None:
        """Take a withdrawn chunk's torrent out and delete its file, so the chunk can be fetched
        again. The file of a blob already in the cache stays: the whole digest vouched for it."""
        async with self._lock:
            torrent = self._torrents.pop(index, None)
            if torrent is not None:
                await self._peer._session.remove(torrent)
        if self.digest not in self._peer.cache:
            await asyncio.to_thread(self.chunk_file(index).unlink, missing_ok=True)

    def connect(self, host: str, port: int) -> None:
        """Dial a peer on every chunk torrent still missing bytes, and on every chunk torrent added
        later: the tracker names peers per blob, not per chunk."""
        self._peers.add((host, port))
        for torrent in self._torrents.values():
            if not torrent.finished:
                torrent.connect(host, port)

    def left(self) -> int:
        """Bytes not yet verified, over all chunks; a chunk with no torrent counts whole."""
        return sum(
            torrent.left() if (torrent := self._torrents.get(chunk.index)) else chunk.length
            for chunk in self.chunks
        )

    def uploaded(self) -> int:
        """Bytes sent to peers, over all chunks, as an announce's `uploaded` reports them: the
        tracker names peers that serve before those that do not."""
        return sum(status.uploaded for status in self.status())

    def complete(self) -> bool:
        """In the cache: every chunk finished and the whole digest matched."""
        done = self._completed
        return done.done() and done.exception() is None

    async def completed(self) -> Path:
        """The blob's marker in the cache once every chunk torrent finished and the whole blob
        matched its digest; raises `DigestMismatch` or `PeerError` (a `DiskError` among them)
        once the blob is dropped and its chunk files deleted."""
        return await asyncio.shield(self._completed)

    async def fail(self, error: Exception) -> None:
        """Give the blob up on this node (its disk cannot hold it, say): dropped, chunk files
        deleted, then `completed` raises `error`."""
        if self._peer.get(self.digest) is self:
            await self._peer.drop(self.digest, error)

    async def _add(self, index: int, metainfo: bytes, *, seed: bool) -> Torrent:
        async with self._lock:
            if self._closed is not None:
                raise self._closed
            if (existing := self._torrents.get(index)) is not None:
                return existing
            if not 0 <= index < len(self.chunks):
                raise PeerError(f"{self.digest} has no chunk {index}")
            torrent = load_chunk(metainfo, self.digest, self.chunks[index])
            with on_disk("seed_state"):
                await asyncio.to_thread(self._peer.cache.save_chunk_torrent, self.digest, index, metainfo)
            credentials = self._credentials
            await self._peer._session.add(
                torrent, self.chunk_file(index), credentials.cert_pem, credentials.key_pem, seed=seed
            )
            self._torrents[index] = torrent
            if not seed:
                for host, port in self._peers:
                    torrent.connect(host, port)
        self._added.set()
        return torrent

    async def _complete(self) -> None:
        try:
            await self._all_finished()
            path = await self._enter_cache()
        except (DigestMismatch, PeerError) as exc:
            logger.error("blob not cached", extra={"digest": str(self.digest), "error": str(exc)})
            await self.fail(exc)
            return
        self._completed.set_result(path)
        self._peer._space_taken.set()

    async def _all_finished(self) -> None:
        """Return once every chunk has a finished torrent. A torrent that fails (or ends any other
        way while it is still the chunk's) fails the blob; one taken out (a withdrawn chunk) is
        waited for again, as is a chunk with no torrent yet."""
        while (index := self._first_unfinished()) is not None:
            torrent = self._torrents.get(index)
            if torrent is None:
                self._added.clear()
                await self._added.wait()
                continue
            try:
                await torrent.wait_finished()
            except PeerError:
                if self._torrents.get(index) is torrent:  # else waiting again would never end
                    raise

    def _first_unfinished(self) -> int | None:
        for chunk in self.chunks:
            torrent = self._torrents.get(chunk.index)
            if torrent is None or not torrent.finished:
                return chunk.index
        return None

    async def _enter_cache(self) -> Path:
        cache = self._peer.cache
        if self.digest in cache:  # seeded again from the cache
            return cache.marker(self.digest)
        # Every downloaded byte on disk before the chunk files are hashed.
        await asyncio.gather(*(torrent.flush() for torrent in self._torrents.values()))
        # Once begun the commit runs to its end, even when the blob is dropped meanwhile: a drop
        # must see whether the marker was written.
        self._commit = asyncio.ensure_future(
            asyncio.to_thread(cache.commit, self.digest, self.size, self.chunk_size)
        )
        with on_disk("commit"):
            return await asyncio.shield(self._commit)

    def _fail(self, error: Exception) -> None:
        if not self._completed.done():
            self._completed.set_exception(error)
            self._completed.exception()  # marked retrieved: nobody need be waiting

    async def _stop(self, error: PeerError) -> None:
        """Stop completing: nothing waits for this blob's torrents any more. `completed` is left
        to whoever stops it, once the files are as they will stay."""
        self._closed = error
        if self._task is asyncio.current_task():
            return  # the blob failed: it is being dropped
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._commit is not None:
            await asyncio.gather(self._commit, return_exceptions=True)

    async def _close(self, error: PeerError) -> None:
        """Stop, then take every chunk torrent out of the session."""
        await self._stop(error)
        async with self._lock:
            for torrent in self._torrents.values():
                await self._peer._session.remove(torrent)
            self._torrents.clear()


class Peer:
    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.cache = BlobCache(config.cache_dir, config.cache_max_bytes)
        self._session = Session(config)
        self._blobs: dict[Digest, ChunkedBlob] = {}
        self._space_taken = asyncio.Event()  # a blob entered the cache: evict
        self._background: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Peer:
        await self._session.__aenter__()
        try:
            for record in await asyncio.to_thread(self.cache.seeds):
                await self._reseed(record)
        except BaseException:
            await self._shut()
            raise
        self._background = [
            spawn(self._keep_house(), name="peer-housekeeping"),
            spawn(self._keep_space(), name="peer-eviction"),
        ]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._shut()

    async def _shut(self) -> None:
        # The torrents go with the session: removing them one by one first would only wait longer.
        stopped = PeerError("peer stopped")
        for blob in self._blobs.values():
            await blob._stop(stopped)
            blob._fail(stopped)
        self._blobs.clear()
        await self._session.__aexit__(None, None, None)

    @property
    def port(self) -> int:
        return self._session.port

    def blobs(self) -> list[ChunkedBlob]:
        return list(self._blobs.values())

    def get(self, digest: Digest) -> ChunkedBlob | None:
        return self._blobs.get(digest)

    def status(self) -> list[Status]:
        """One entry per chunk torrent."""
        return [status for blob in self._blobs.values() for status in blob.status()]

    async def open(self, digest: Digest, size: int, chunk_size: int, credentials: Credentials) -> ChunkedBlob:
        """The blob's `ChunkedBlob` (the one already open, if any), its credentials kept for
        seeding it after a restart. `PeerError` for a layout the blob cannot have."""
        if (blob := self._blobs.get(digest)) is not None:
            return blob
        blob = self._open(digest, size, chunk_size, credentials)
        try:
            with on_disk("seed_state"):
                await asyncio.to_thread(self.cache.save_seed, digest, credentials)
        except DiskError as exc:
            await self.drop(digest, exc)
            raise
        return blob

    async def drop(self, digest: Digest, error: Exception | None = None) -> None:
        """Take all the blob's torrents out of the session and forget its seeding state. A blob
        in the cache stays there; an incomplete one's chunk files are deleted. Only then does its
        `completed` raise `error` (by default: dropped): whoever hears of it finds the files gone."""
        blob = self._blobs.pop(digest, None)
        dropped = PeerError(f"{digest}: dropped")
        try:
            if blob is not None:
                await blob._close(dropped)
            if digest in self.cache:
                await asyncio.to_thread(self.cache.forget_seed, digest)
            else:
                await asyncio.to_thread(self.cache.discard, digest)
        finally:
            if blob is not None:
                blob._fail(error or dropped)

    async def evict(self) -> None:
        """Delete least recently used blobs beyond `cache_max_bytes`, never a pinned one."""
        for digest in self.cache.to_evict():
            await self.drop(digest)
            with contextlib.suppress(RuntimeError):  # pinned since the decision
                await asyncio.to_thread(self.cache.evict, digest)

    def _open(self, digest: Digest, size: int, chunk_size: int, credentials: Credentials) -> ChunkedBlob:
        """A new `ChunkedBlob` for a layout the blob can have (a cached blob's own)."""
        try:
            chunks = plan(size, chunk_size)
        except ValueError as exc:
            raise PeerError(f"{digest}: {exc}") from None
        if size == 0:
            raise PeerError(f"{digest}: an empty blob has no torrent")
        if digest in self.cache:
            cached = self.cache.layout(digest)
            if cached != (size, chunk_size):
                raise PeerError(f"{digest}: cached as (size, chunk size) {cached}, not {(size, chunk_size)}")
        else:
            with on_disk("chunk_write"):
                self.cache.prepare(digest)
        blob = ChunkedBlob(self, digest, chunks, chunk_size, credentials)
        self._blobs[digest] = blob
        return blob

    async def _reseed(self, record: SeedRecord) -> None:
        """Seed a cached blob again, each chunk in seed mode: its digest matched when it entered."""
        try:
            blob = self._open(record.digest, record.size, record.chunk_size, record.credentials)
            for index, metainfo in sorted(record.metainfo.items()):
                await blob.seed(index, metainfo)
        except PeerError as exc:
            logger.warning(
                "not seeding a cached blob", extra={"digest": str(record.digest), "error": str(exc)}
            )
            await self.drop(record.digest)

    async def _keep_space(self) -> None:
        """Evict after each blob that enters the cache, from this one task: a blob's own task
        evicting could drop a blob whose task is evicting in turn."""
        while True:
            await self._space_taken.wait()
            self._space_taken.clear()
            await self.evict()

    async def _keep_house(self) -> None:
        """Stop seeding blobs whose certificate expired: no peer would accept it any more."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            for digest, blob in list(self._blobs.items()):
                if blob.not_after <= time.time():
                    logger.info("certificate expired; not seeding", extra={"digest": str(digest)})
                    await self.drop(digest)
