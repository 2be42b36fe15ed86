"""Layers through the swarm: the node's `BlobSource` when a tracker is configured.

For a layer GET the registry is asked first (`HEAD` with dockerd's own credential): it stays the
authority on what dockerd may pull, and it tells the size, so the response headers go out at once.
The bytes then come from the cache, from peers (leecher), from the registry while this node fetches
the layer for the whole cluster (origin), or from the registry directly whenever the peer-to-peer
path fails: a pull never fails because of it. One fetch per blob per node, however many clients ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from common.certs import key_pem, make_csr, new_key
from common.ids import Digest, NodeId
from common.tasks import spawn
from peer.cache import Credentials, DigestMismatch
from peer.engine import Blob, Peer
from peer.session import PeerError
from peer.stream import Stalled
from proxy.blobs import BlobRequest, UpstreamBlobSource
from proxy.config import NodeConfig
from proxy.metrics import NodeMetrics
from proxy.routing import without
from proxy.upstream import CHUNK, Upstream, UpstreamBroken
from tracker.client import JoinAnswer, TrackerClient, TrackerRefused, TrackerUnavailable

logger = logging.getLogger(__name__)

Chunks = AsyncIterator[tuple[bytes, str]]  # bytes and the `source` label they are counted under
RegistryRange = Callable[[int, int], AsyncIterator[bytes]]


# Cached blobs are read 1 MiB per thread hop: at 256 KiB the hops cost a sixth of the node's CPU
# (tests/bench/cache_hit.py).
CACHE_READ = 2**20
ORIGIN_FAILURES = (DigestMismatch, UpstreamBroken, OSError, PeerError, TrackerUnavailable, TrackerRefused)


class P2PFailed(Exception):
    """The peer-to-peer path cannot deliver the rest; the registry will."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The `[start, end)` a single-range `Range: bytes=` header asks for; None for the whole blob.

    Raises `ValueError` for anything else (multiple ranges, suffix ranges, out of bounds): the
    registry answers those itself.
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or not dash or not first.isdigit() or (last and not last.isdigit()):
        raise ValueError(f"unsupported range {header[:40]!r}")
    start, end = int(first), min(int(last) + 1, size) if last else size
    if start >= end:
        raise ValueError(f"unsatisfiable range {header[:40]!r}")
    return start, end


@dataclass
class WaitProgress:
    """Whether a waiter should stop waiting: the origin's byte count has not moved for
    `stall_timeout` seconds (or nobody is fetching at all), the same patience as with a swarm."""

    stall_timeout: float
    last_bytes: int | None = None
    since: float | None = None

    def stalled(self, origin_bytes: int | None, now: float) -> bool:
        if self.since is None or (origin_bytes is not None and origin_bytes != self.last_bytes):
            self.last_bytes, self.since = origin_bytes, now
        return now - self.since >= self.stall_timeout


class Fetch(Protocol):
    """One blob's download on this node, shared by every client that asks for it."""

    def read(self, start: int, end: int, registry: RegistryRange) -> Chunks: ...


@dataclass
class LeechFetch:
    blob: Blob

    async def read(self, start: int, end: int, registry: RegistryRange) -> Chunks:
        switched = False

        async def fallback(lo: int, hi: int) -> AsyncIterator[bytes]:
            nonlocal switched
            swarm: dict[str, Any] = {}
            with contextlib.suppress(PeerError):  # the torrent may have failed: that is the news
                status = self.blob.torrent.status()
                swarm = {"peers": status.peers, "progress": round(status.progress, 4), "state": status.state}
            logger.warning(
                "swarm stalled; rest from the registry", extra={"digest": str(self.blob.digest), **swarm}
            )
            switched = True
            async for chunk in registry(lo, hi):
                yield chunk

        try:
            async for chunk in self.blob.stream(start, end, fallback):
                yield chunk, "upstream" if switched else "p2p"
        except (PeerError, Stalled, EOFError) as exc:
            raise P2PFailed(str(exc)) from None


@dataclass
class OriginFetch:
    """This node fetches the blob from the registry for the cluster: clients read as it arrives."""

    digest: Digest
    size: int
    path: os.PathLike[str]
    written: int = 0
    failed: BaseException | None = None
    done: bool = False
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def read(self, start: int, end: int, registry: RegistryRange) -> Chunks:
        position = start
        try:
            file = open(self.path, "rb")  # noqa: SIM115 (the name may move into the cache: the fd stays)
        except FileNotFoundError:
            raise P2PFailed("origin download already moved into the cache") from None
        with file:
            while position < end:
                await self._wait_past(position)
                if self.written <= position:
                    raise P2PFailed(f"origin download failed: {self.failed}")
                data = os.pread(file.fileno(), min(CHUNK, min(self.written, end) - position), position)
                position += len(data)
                yield data, "upstream"

    async def _wait_past(self, position: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.written > position or self.done)

    async def advanced(self, written: int) -> None:
        async with self._changed:
            self.written = written
            self._changed.notify_all()

    async def finished(self, error: BaseException | None) -> None:
        async with self._changed:
            self.failed, self.done = error, True
            self._changed.notify_all()


class P2PBlobSource:
    def __init__(
        self,
        config: NodeConfig,
        peer: Peer,
        tracker: TrackerClient,
        upstream: Upstream,
        metrics: NodeMetrics,
    ) -> None:
        self._config = config
        self._node = NodeId.parse(config.node_id)
        self._peer = peer
        self._tracker = tracker
        self._upstream = upstream
        self._metrics = metrics
        self._direct = UpstreamBlobSource(upstream, metrics)
        self._fetches: dict[Digest, asyncio.Task[Fetch | None]] = {}
        self.origins: dict[Digest, OriginFetch] = {}

    def status(self) -> list[dict[str, Any]]:
        """Blobs this node fetches from the registry for the cluster, then its torrents."""
        origins = [
            {"digest": str(f.digest), "state": "origin", "progress": round(f.written / max(f.size, 1), 4),
             "size": f.size}
            for f in self.origins.values()
        ]  # fmt: skip
        return origins + [dataclasses.asdict(s) for s in self._peer.status()]

    async def serve(self, blob: BlobRequest) -> web.StreamResponse:
        request = blob.request
        if request.method != "GET":
            return await self._direct.serve(blob)
        size = await self._registry_size(blob)
        try:
            wanted = None if size is None else parse_range(request.headers.get("Range"), size)
        except ValueError:
            size = None
        if size is None or size < self._config.p2p_min_bytes:
            return await self._direct.serve(blob)
        start, end = wanted or (0, size)
        response = web.StreamResponse(status=206 if wanted else 200)
        response.content_length = end - start
        response.content_type = "application/octet-stream"
        response.headers["Docker-Content-Digest"] = str(blob.digest)
        if wanted:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await response.prepare(request)
        async for chunk, source in self._body(blob, start, end):
            await response.write(chunk)
            self._metrics.blob_bytes.labels(source).inc(len(chunk))
        await response.write_eof()
        return response

    async def _registry_size(self, blob: BlobRequest) -> int | None:
        """The blob's size when the registry lets dockerd's credential have it, else None."""
        headers = without(blob.request.headers.items(), "Range")
        async with self._upstream.request(
            blob.registry, "HEAD", blob.path_qs, headers, follow_redirects=True
        ) as response:
            return response.content_length if response.status == 200 else None

    async def _body(self, blob: BlobRequest, start: int, end: int) -> Chunks:
        position = start
        try:
            async for chunk, source in self._from_node(blob, start, end):
                position += len(chunk)
                yield chunk, source
        except P2PFailed as exc:
            context = {"digest": str(blob.digest), "error": str(exc), "offset": position}
            logger.warning("peer-to-peer path failed; rest from the registry", extra=context)
            async for chunk in self._registry_range(blob)(position, end):
                yield chunk, "upstream"

    async def _from_node(self, blob: BlobRequest, start: int, end: int) -> Chunks:
        digest = blob.digest
        if digest in self._peer.cache:
            self._fetches.pop(digest, None)
            async for chunk in self._read_cached(digest, start, end):
                yield chunk, "cache"
            return
        fetch = await self._fetch(blob)
        if fetch is None:
            raise P2PFailed("no swarm for this blob")
        async for item in fetch.read(start, end, self._registry_range(blob)):
            yield item

    async def _read_cached(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        with self._peer.cache.pin(digest) as path, open(path, "rb") as file:
            position = start
            while position < end:
                size = min(CACHE_READ, end - position)
                data = await asyncio.to_thread(os.pread, file.fileno(), size, position)
                if not data:
                    raise P2PFailed("cached blob shorter than its size")
                position += len(data)
                yield data

    def _registry_range(self, blob: BlobRequest) -> RegistryRange:
        async def fetch(start: int, end: int) -> AsyncIterator[bytes]:
            headers = without(blob.request.headers.items(), "Range")
            headers.append(("Range", f"bytes={start}-{end - 1}"))
            async with self._upstream.request(
                blob.registry, "GET", blob.path_qs, headers, follow_redirects=True
            ) as response:
                if response.status not in (200, 206):
                    raise UpstreamBroken(f"registry answered {response.status} to a range request")
                skip = start if response.status == 200 else 0  # a registry that ignored Range
                async for chunk in response.content.iter_chunked(CHUNK):
                    if skip:
                        dropped, skip = min(skip, len(chunk)), max(0, skip - len(chunk))
                        chunk = chunk[dropped:]
                    if chunk:
                        yield chunk

        return fetch

    async def _fetch(self, blob: BlobRequest) -> Fetch | None:
        task = self._fetches.get(blob.digest)
        if task is None or (task.done() and (task.cancelled() or task.exception() or task.result() is None)):
            task = spawn(self._start(blob), name=f"fetch-{blob.digest.hex[:12]}")
            self._fetches[blob.digest] = task
        return await asyncio.shield(task)

    async def _start(self, blob: BlobRequest) -> Fetch | None:
        """Join the blob's swarm and start fetching it; None when the tracker says no or is away."""
        key = new_key()
        csr = make_csr(key)
        authorization = blob.request.headers.get("Authorization")
        progress = WaitProgress(self._config.stall_timeout)
        while True:
            try:
                answer = await self._tracker.join(
                    blob.digest, blob.registry.host, blob.repository, self._node, csr, authorization
                )
            except (TrackerUnavailable, TrackerRefused) as exc:
                logger.warning("no swarm: %s", exc, extra={"digest": str(blob.digest)})
                return None
            if answer.role != "wait":
                break
            if progress.stalled(answer.origin_bytes, time.monotonic()):
                logger.warning(
                    "origin made no progress; from the registry", extra={"digest": str(blob.digest)}
                )
                return None
            await asyncio.sleep(answer.retry_after or 1.0)
        assert answer.cert is not None and answer.ca is not None
        if answer.role == "leecher":
            assert answer.torrent is not None and answer.announce is not None
            credentials = Credentials(answer.cert.encode(), key_pem(key), answer.announce)
            try:
                return LeechFetch(await self._peer.fetch(blob.digest, answer.torrent, credentials))
            except PeerError as exc:
                logger.warning("cannot join swarm: %s", exc, extra={"digest": str(blob.digest)})
                return None
        return await self._become_origin(blob, answer, key_pem(key))

    async def _become_origin(self, blob: BlobRequest, answer: JoinAnswer, key: bytes) -> OriginFetch | None:
        size = await self._registry_size(blob)
        if size is None:
            return None
        path = self._peer.cache.partial_path(blob.digest).with_suffix(".origin")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        fetch = OriginFetch(blob.digest, size, path)
        self.origins[blob.digest] = fetch
        spawn(self._run_origin(blob, fetch, answer, key), name=f"origin-{blob.digest.hex[:12]}")
        return fetch

    async def _run_origin(
        self, blob: BlobRequest, fetch: OriginFetch, answer: JoinAnswer, key: bytes
    ) -> None:
        assert answer.lease is not None and answer.cert is not None and answer.ca is not None
        lease = answer.lease
        reporter = spawn(self._keep_lease(fetch, lease, answer.lease_seconds or 60), name="lease")
        error: BaseException | None = None
        try:
            await self._download(blob, fetch)
            await self._peer.commit(blob.digest, fetch.path)  # type: ignore[arg-type]
            metainfo = await self._peer.make_metainfo(blob.digest, answer.ca.encode())
            announce = await self._tracker.publish(blob.digest, lease, metainfo)
            await self._peer.seed(blob.digest, metainfo, Credentials(answer.cert.encode(), key, announce))
            logger.info("published and seeding", extra={"digest": str(blob.digest), "bytes": fetch.size})
        except (
            DigestMismatch,
            UpstreamBroken,
            OSError,
            PeerError,
            TrackerUnavailable,
            TrackerRefused,
        ) as exc:
            logger.error("origin fetch failed: %s", exc, extra={"digest": str(blob.digest)})
            error = exc
        finally:
            reporter.cancel()
            await fetch.finished(error)
            self.origins.pop(blob.digest, None)
            self._fetches.pop(blob.digest, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fetch.path)

    async def _download(self, blob: BlobRequest, fetch: OriginFetch) -> None:
        written = 0
        with open(fetch.path, "r+b") as file:
            async for chunk in self._registry_range(blob)(0, fetch.size):
                os.pwrite(file.fileno(), chunk, written)
                written += len(chunk)
                await fetch.advanced(written)
            if written != fetch.size:
                raise UpstreamBroken(f"registry sent {written} of {fetch.size} bytes")
            await asyncio.to_thread(os.fsync, file.fileno())

    async def _keep_lease(self, fetch: OriginFetch, lease: str, lease_seconds: int) -> None:
        """Tell the tracker about progress well within the lease, so waiters are not promoted."""
        while True:
            await asyncio.sleep(max(1.0, lease_seconds / 4))
            with contextlib.suppress(TrackerUnavailable, TrackerRefused):
                await self._tracker.progress(fetch.digest, lease, fetch.written)
