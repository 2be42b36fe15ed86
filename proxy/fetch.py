"""One blob's download on this node, chunk by chunk, for as long as the blob is not complete.

A `BlobFetch` joins the blob's swarm once (one blob-scoped certificate for all its chunk
torrents), then keeps one long-poll `sync` with the tracker open to learn each chunk torrent as
soon as it is published and each chunk the tracker leases to this node. A leased chunk is fetched
from the registry by this node for the cluster, written to its chunk file, published and seeded.
Readers take a chunk from whatever this node has for it: its own registry download as it arrives,
else the chunk's torrent as pieces verify; a reader that receives nothing for `stall_timeout` is
told the chunk is unavailable here and goes to the registry itself, whatever an origin claims.
A disk error (a full cache disk, say) gives the blob up on this node: its readers go to the
registry at once, for every chunk, and the fetch takes on no more chunks.

`P2PBlobSource` alone creates, finishes, cancels and awaits fetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from common.chunks import Chunk
from common.ids import Digest
from common.tasks import spawn
from peer.cache import DigestMismatch
from peer.engine import ChunkedBlob
from peer.session import DiskError, PeerError, on_disk
from peer.stream import Stalled
from proxy.upstream import UpstreamBroken
from tracker.client import (
    ChunkLease,
    ChunkTorrent,
    Swarm,
    TrackerClient,
    TrackerRefused,
    TrackerUnavailable,
)

logger = logging.getLogger(__name__)

Chunks = AsyncIterator[tuple[bytes, str]]  # bytes and the `source` label they are counted under
# The bytes [start, end) of a blob, all of them or `UpstreamBroken`.
RegistryRange = Callable[[int, int], AsyncIterator[bytes]]

# A sync is held open this long by the tracker when it has nothing new: a node learns of a
# published chunk within milliseconds at the cost of one request per node per SYNC_WAIT.
SYNC_WAIT = 25.0
# After a failed sync: exponential backoff with jitter, so N nodes do not retry in step.
SYNC_RETRY_FIRST = 0.5
SYNC_RETRY_MAX = 10.0
ORIGIN_FAILURES = (DigestMismatch, UpstreamBroken, OSError, PeerError, TrackerUnavailable, TrackerRefused)


def split(chunk: Chunk, count: int) -> list[Chunk]:
    """`chunk` as up to `count` consecutive ranges of about equal length (blob offsets)."""
    count = max(1, min(count, chunk.length))
    bounds = [chunk.start + chunk.length * i // count for i in range(count + 1)]
    return [Chunk(chunk.index, lo, hi) for lo, hi in itertools.pairwise(bounds)]


def write_at(fd: int, data: bytes, offset: int) -> None:
    """All of `data` at `offset`: a short write (a full disk) is not taken for a whole one."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if not written:  # no byte and no error: end rather than loop on it
            raise OSError(errno.ENOSPC, "no byte written")
        view, offset = view[written:], offset + written


class Unavailable(Exception):
    """This node cannot deliver the rest of a range; `reason` labels the fallback metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class ChunkDownload:
    """This node fetches one chunk from the registry for the cluster, in `parts` ranges at once;
    readers follow it. `written` is the chunk's contiguous prefix on disk (what a reader may read),
    `fetched` all bytes so far (what the lease's progress reports count)."""

    chunk: Chunk
    lease: ChunkLease
    parts: list[Chunk]  # blob offsets of each range fetched on its own connection
    received: list[int] = field(default_factory=list)  # bytes written so far, per part
    written: int = 0
    done: bool = False
    failed: BaseException | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self.received = [0] * len(self.parts)

    @property
    def fetched(self) -> int:
        return sum(self.received)

    async def advanced(self, part: int, received: int) -> None:
        async with self._changed:
            self.received[part] = received
            prefix = 0
            for range_, count in zip(self.parts, self.received, strict=True):
                prefix += count
                if count < range_.length:
                    break
            self.written = prefix
            self._changed.notify_all()

    async def finished(self, error: BaseException | None) -> None:
        async with self._changed:
            self.failed, self.done = error, True
            self._changed.notify_all()

    async def wait_past(self, offset: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.written > offset or self.done)


class BlobFetch:
    def __init__(
        self,
        swarm: Swarm,
        blob: ChunkedBlob,
        tracker: TrackerClient,
        registry: RegistryRange,
        stall_timeout: float,
        origin_connections: int,
    ) -> None:
        self.swarm = swarm
        self.blob = blob
        self.digest: Digest = blob.digest
        self.registry = registry  # the newest client's credential: tokens expire, pulls go on
        self._tracker = tracker
        self._stall_timeout = stall_timeout
        self._origin_connections = origin_connections
        self._known: dict[int, str] = {}  # chunk index -> info-hash of the torrent in the session
        self._refused: set[str] = set()  # info-hashes the session would not take: not asked again
        # Torrents published for a chunk this node fetches itself (its lease ran out): not added
        # over the file being written, and asked for again should that download fail.
        self._passed: dict[int, str] = {}
        self._downloads: dict[int, ChunkDownload] = {}  # this node's registry downloads, kept once done
        self._ended: Exception | None = None  # why the blob was given up here: readers go elsewhere
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    # lifecycle (the owner's)

    async def start(self) -> None:
        await self._apply(self.swarm.chunks, [], self.swarm.leases)
        self._spawn(self._sync(), "sync")

    async def close(self, why: Exception | None = None) -> None:
        """Cancel the fetch's tasks; with `why` (the blob failed on this node) its readers are told
        at once rather than after `stall_timeout`."""
        self._ended = self._ended or why
        async with self._changed:
            self._changed.notify_all()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def ended(self) -> bool:
        """The blob was given up on this node: nothing more from this fetch, for any chunk."""
        return self._ended is not None

    def status(self) -> dict[str, object]:
        return {
            "digest": str(self.digest),
            "state": "fetching",
            "chunks": len(self.blob.chunks),
            "torrents": len(self._known),
            "origin_of": sorted(self._downloads),  # chunks this node fetched from the registry
            "left": self.blob.left(),
        }

    # reading

    async def read(self, chunk: Chunk, start: int, end: int) -> Chunks:
        """Bytes [start, end) of `chunk` (blob offsets) in order; `Unavailable` when this node has
        nothing for the chunk for `stall_timeout`, what it had failed, or the fetch ended. A chunk
        file this node cannot read is a `DiskError`."""
        async with self._changed:
            ready = lambda: (  # noqa: E731
                self.ended or chunk.index in self._downloads or self.blob.torrent(chunk.index) is not None
            )
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), self._stall_timeout)
            except TimeoutError:
                raise Unavailable(
                    "no_chunk", f"no torrent and no lease for chunk {chunk.index} in {self._stall_timeout} s"
                ) from None
        if self._ended is not None:
            reason = "disk_error" if isinstance(self._ended, DiskError) else "peer_error"
            raise Unavailable(reason, f"given up on this node: {self._ended}")
        download = self._downloads.get(chunk.index)
        if download is not None:
            async for data in self._follow(download, start, end):
                yield data, "upstream"
            return
        async for item in self._leech(chunk, start, end):
            yield item

    async def _follow(self, download: ChunkDownload, start: int, end: int) -> AsyncIterator[bytes]:
        """This node's registry download of a chunk, read from its file as it arrives (or once it
        is complete: reading the file costs less than reading its torrent's pieces)."""
        chunk = download.chunk
        with on_disk("chunk_read"), open(self.blob.chunk_file(chunk.index), "rb") as file:
            position = start
            while position < end:
                await download.wait_past(position - chunk.start)
                available = chunk.start + download.written
                if available <= position:
                    raise Unavailable("origin_failed", f"chunk {chunk.index}: {download.failed}")
                size = min(available, end) - position
                data = await asyncio.to_thread(os.pread, file.fileno(), size, position - chunk.start)
                if not data:
                    raise OSError(errno.EIO, f"chunk file {chunk.index} is short")
                position += len(data)
                yield data

    async def _leech(self, chunk: Chunk, start: int, end: int) -> Chunks:
        """The chunk's torrent as pieces verify; a stalled swarm's missing bytes from the registry,
        which go into the torrent too, so the node goes on seeding the chunk."""
        switched = False

        async def refill(lo: int, hi: int) -> AsyncIterator[bytes]:
            nonlocal switched
            logger.warning(
                "chunk swarm stalled; its rest from the registry",
                extra={"digest": str(self.digest), "chunk": chunk.index, "offset": chunk.start + lo},
            )
            switched = True
            async for data in self.registry(chunk.start + lo, chunk.start + hi):
                yield data

        try:
            async for data in self.blob.stream(chunk.index, start - chunk.start, end - chunk.start, refill):
                yield data, "upstream" if switched else "p2p"
        except (PeerError, Stalled, EOFError) as exc:
            raise Unavailable("peer_error", f"chunk {chunk.index}: {exc}") from None

    # the tracker's news

    async def _sync(self) -> None:
        retry = SYNC_RETRY_FIRST
        while not self.ended and (
            len(self._known) < len(self.blob.chunks) or not all(d.done for d in self._downloads.values())
        ):
            try:
                known = [*self._known.values(), *self._refused, *self._passed.values()]
                answer = await self._tracker.sync(self.digest, self.swarm.key, known, SYNC_WAIT)
            except (TrackerUnavailable, TrackerRefused) as exc:
                logger.warning("sync failed: %s", exc, extra={"digest": str(self.digest)})
                await asyncio.sleep(retry * random.uniform(0.5, 1.5))
                retry = min(retry * 2, SYNC_RETRY_MAX)
                continue
            retry = SYNC_RETRY_FIRST
            await self._apply(answer.chunks, answer.withdrawn, answer.leases)

    async def _apply(
        self, chunks: list[ChunkTorrent], withdrawn: list[str], leases: list[ChunkLease]
    ) -> None:
        try:
            await self._withdraw(withdrawn)
            await self._leech_published(chunks)
            self._take_leases(leases)
        except DiskError as exc:
            await self._give_up(exc)
        async with self._changed:
            self._changed.notify_all()

    async def _withdraw(self, withdrawn: list[str]) -> None:
        for index in [i for i, info_hash in self._known.items() if info_hash in withdrawn]:
            logger.warning(
                "chunk withdrawn by the tracker", extra={"digest": str(self.digest), "chunk": index}
            )
            del self._known[index]
            await self.blob.drop_chunk(index)

    async def _leech_published(self, chunks: list[ChunkTorrent]) -> None:
        for torrent in chunks:
            if self.ended:  # given up while an answer was on its way: its blob is dropped
                return
            if torrent.index in self._downloads:
                self._passed[torrent.index] = torrent.info_hash
            elif torrent.index not in self._known:
                try:
                    await self.blob.leech(torrent.index, torrent.metainfo)
                except DiskError:
                    raise
                except PeerError as exc:
                    logger.warning("cannot add a chunk torrent: %s", exc, extra={"digest": str(self.digest)})
                    self._refused.add(torrent.info_hash)
                    continue
                self._known[torrent.index] = torrent.info_hash

    def _take_leases(self, leases: list[ChunkLease]) -> None:
        if self.ended:  # no chunk file may appear again once the blob's files are deleted
            return
        for lease in leases:
            if lease.index not in self._downloads and lease.index not in self._known:
                chunk = self.blob.chunks[lease.index]
                download = ChunkDownload(chunk, lease, split(chunk, self._origin_connections))
                # The file exists before anyone can see the download: a reader opens it at once.
                with on_disk("chunk_write"):
                    self.blob.chunk_file(lease.index).write_bytes(b"")
                self._downloads[lease.index] = download
                self._spawn(self._originate(download), f"origin-{lease.index}")

    async def _give_up(self, error: DiskError) -> None:
        """This node's disk cannot hold the blob: its readers go to the registry at once, the fetch
        takes on nothing more, and the blob is dropped (its owner hears of it from `completed`)."""
        if self._ended is not None:
            return
        self._ended = error
        async with self._changed:
            self._changed.notify_all()
        await self.blob.fail(error)

    # this node as a chunk's origin

    async def _originate(self, download: ChunkDownload) -> None:
        chunk, lease = download.chunk, download.lease
        keepalive = spawn(self._keep_lease(download), name=f"lease-{self.digest.hex[:12]}-{chunk.index}")
        error: BaseException | None = None
        try:
            await self._download(download)
            with contextlib.suppress(TrackerUnavailable, TrackerRefused):  # the keep-alive says it later
                await self._tracker.progress(self.digest, lease.token, chunk.length)  # next chunk, anyone
            metainfo = await self.blob.make_metainfo(chunk.index, self.swarm.ca.encode())
            info_hash = await self._tracker.publish_chunk(self.digest, chunk.index, lease.token, metainfo)
            await self.blob.seed(chunk.index, metainfo)
            self._known[chunk.index] = info_hash
            logger.info(
                "chunk published and seeding",
                extra={"digest": str(self.digest), "chunk": chunk.index, "bytes": chunk.length},
            )
        except ORIGIN_FAILURES as exc:
            logger.error(
                "chunk origin failed: %s", exc, extra={"digest": str(self.digest), "chunk": chunk.index}
            )
            error = exc
        finally:
            keepalive.cancel()
            await download.finished(error)
            if error is not None:  # the chunk may be leased to this node again, or leeched
                del self._downloads[chunk.index]
                self._passed.pop(chunk.index, None)
                with contextlib.suppress(OSError):
                    os.unlink(self.blob.chunk_file(chunk.index))
            async with self._changed:
                self._changed.notify_all()
        if isinstance(error, DiskError):
            await self._give_up(error)

    async def _download(self, download: ChunkDownload) -> None:
        """Every part of the chunk at once, each on its own registry connection, for registries
        (a CDN, object storage) whose single flows are slower than a node's link: the whole
        cluster waits for this chunk. On the lab's shaped links 2 parts were no faster than 1."""
        with on_disk("chunk_write"):
            file = open(self.blob.chunk_file(download.chunk.index), "r+b")  # noqa: SIM115
        with file:
            parts = [  # awaited here, failures included: not `spawn`, which logs them as crashes
                asyncio.create_task(self._download_part(file.fileno(), download, i), name=f"part-{i}")
                for i in range(len(download.parts))
            ]
            try:
                await asyncio.gather(*parts)
            finally:
                for part in parts:
                    part.cancel()
                await asyncio.gather(*parts, return_exceptions=True)
            with on_disk("chunk_write"):
                await asyncio.to_thread(os.fsync, file.fileno())

    async def _download_part(self, fd: int, download: ChunkDownload, part: int) -> None:
        chunk, range_ = download.chunk, download.parts[part]
        received = 0
        async for data in self.registry(range_.start, range_.end):
            with on_disk("chunk_write"):
                write_at(fd, data, range_.start - chunk.start + received)
            received += len(data)
            await download.advanced(part, received)

    async def _keep_lease(self, download: ChunkDownload) -> None:
        """Report progress well within the lease, so the chunk is not leased to someone else."""
        while True:
            await asyncio.sleep(max(1.0, download.lease.seconds / 4))
            with contextlib.suppress(TrackerUnavailable, TrackerRefused):
                await self._tracker.progress(self.digest, download.lease.token, download.fetched)

    def _spawn(self, coro: object, what: str) -> None:
        task = spawn(coro, name=f"{what}-{self.digest.hex[:12]}")  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
