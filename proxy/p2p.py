"""Layers through the swarm: the node's `BlobSource` when a tracker is configured.

For a layer GET the registry is asked first (`HEAD` with dockerd's own credential): it stays the
authority on what dockerd may pull, and it tells the size, so the response headers go out at once.
The body is then one loop over ordered sources, chunk by chunk: the cache (a complete blob), the
swarm (this node's `BlobFetch`: its own registry download of a chunk it fetches for the cluster,
or the chunk's torrent), and the registry (`Range`, dockerd's credential). A source that cannot
go on says why at an offset; the next one carries on from there, with one log line and one
`shoal_p2p_fallbacks_total{reason}` per switch. A pull never fails because the peer-to-peer path
failed, and it never completes with wrong bytes: a whole-blob response is hashed as it streams and
cut before its last bytes when the digest does not match, so the client's own retry starts clean.
A cached blob found wrong leaves the cache. Nor does a disk error end a pull: the layer is given up
on this node (its files deleted, one error line, `shoal_disk_errors_total{operation}`) and the
registry sends the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from aiohttp import web

from common.certs import key_pem, make_csr, new_key
from common.chunks import chunks_in
from common.ids import Digest, NodeId, is_decimal
from common.tasks import spawn
from peer.cache import Credentials, DigestMismatch
from peer.engine import Peer
from peer.session import DiskError, PeerError, on_disk
from proxy.blobs import BlobRequest, UpstreamBlobSource
from proxy.config import NodeConfig
from proxy.fetch import BlobFetch, Chunks, RegistryRange, Unavailable
from proxy.metrics import NodeMetrics
from proxy.routing import without
from proxy.upstream import Upstream, UpstreamBroken
from tracker.client import TrackerClient, TrackerRefused, TrackerUnavailable

logger = logging.getLogger(__name__)

# Cached blobs are read 1 MiB per thread hop: at 256 KiB the hops cost a sixth of the node's CPU
# (tests/bench/cache_hit.py).
CACHE_READ = 2**20


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The `[start, end)` a single-range `Range: bytes=` header asks for; None for the whole blob.

    Raises `ValueError` for anything else (multiple ranges, suffix ranges, out of bounds): the
    registry answers those itself.
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or not dash or not is_decimal(first) or (last and not is_decimal(last)):
        raise ValueError(f"unsupported range {header[:40]!r}")
    start, end = int(first), min(int(last) + 1, size) if last else size
    if start >= end:
        raise ValueError(f"unsatisfiable range {header[:40]!r}")
    return start, end


class P2PBlobSource:
    """Owns every `BlobFetch`: starts one per blob on first request, removes it once the blob is
    complete in the cache (or found wrong), and cancels them all on exit."""

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
        self._fetches: dict[Digest, BlobFetch] = {}
        self._joining: dict[Digest, asyncio.Task[BlobFetch | Unavailable]] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> P2PBlobSource:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tasks = [*self._joining.values(), *self._watchers]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for fetch in self._fetches.values():
            await fetch.close()
        self._fetches.clear()

    def status(self) -> list[dict[str, Any]]:
        """Blobs this node is fetching, then its chunk torrents."""
        fetching = [fetch.status() for fetch in self._fetches.values()]
        return fetching + [dataclasses.asdict(s) for s in self._peer.status()]

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
        await self._send(response, blob, start, end, whole=wanted is None)
        await response.write_eof()
        return response

    async def _send(
        self, response: web.StreamResponse, blob: BlobRequest, start: int, end: int, *, whole: bool
    ) -> None:
        """Stream the body, one piece of data held back: a whole blob's last bytes go out only
        once the digest of everything sent matched."""
        digest = hashlib.sha256() if whole else None
        held: tuple[bytes, str] | None = None
        async for data, source in self._body(blob, start, end):
            if digest is not None:
                digest.update(data)
            if held is not None:
                await self._write(response, *held)
            held = data, source
        if digest is not None and digest.hexdigest() != blob.digest.hex:
            await self._wrong_bytes(blob)
            raise UpstreamBroken(f"{blob.digest}: the bytes do not match the digest; response cut short")
        if held is not None:
            await self._write(response, *held)

    async def _write(self, response: web.StreamResponse, data: bytes, source: str) -> None:
        await response.write(data)
        self._metrics.blob_bytes.labels(source).inc(len(data))

    async def _registry_size(self, blob: BlobRequest) -> int | None:
        """The blob's size when the registry lets dockerd's credential have it, else None."""
        headers = without(blob.request.headers.items(), "Range")
        async with self._upstream.request(
            blob.registry, "HEAD", blob.path_qs, headers, follow_redirects=True
        ) as response:
            return response.content_length if response.status == 200 else None

    # the sources, in order

    async def _body(self, blob: BlobRequest, start: int, end: int) -> Chunks:
        """This node's bytes while it has them, then the registry's from the offset reached."""
        registry = self._registry_range(blob)
        position = start
        try:
            async for data, source in self._from_node(blob, registry, start, end):
                position += len(data)
                yield data, source
        except DiskError as exc:  # reading a chunk file: the layer cannot be trusted to this disk
            self._disk_failed(blob.digest, exc)
            await self._forget(blob.digest)
            self._switched(blob.digest, Unavailable("disk_error", str(exc)), position)
        except Unavailable as why:
            self._switched(blob.digest, why, position)
        else:
            return
        async for data in registry(position, end):
            yield data, "upstream"

    async def _from_node(self, blob: BlobRequest, registry: RegistryRange, start: int, end: int) -> Chunks:
        """The cache's bytes, else the swarm's chunk by chunk (a chunk it cannot deliver from the
        registry); `Unavailable` once there is no swarm, or the fetch ended."""
        if blob.digest in self._peer.cache:
            async for data in self._read_cached(blob.digest, start, end):
                yield data, "cache"
            return
        fetch = await self._fetch(blob, registry)
        for chunk in chunks_in(fetch.blob.chunks, start, end):
            position = max(start, chunk.start)
            stop = min(end, chunk.end)
            try:
                async for data, source in fetch.read(chunk, position, stop):
                    position += len(data)
                    yield data, source
            except Unavailable as why:
                if fetch.ended:  # nothing more from it for any chunk
                    raise
                self._switched(blob.digest, why, position)
                async for data in registry(position, stop):
                    yield data, "upstream"

    def _switched(self, digest: Digest, why: Unavailable, offset: int) -> None:
        logger.warning(
            "from the registry: %s",
            why,
            extra={"digest": str(digest), "reason": why.reason, "offset": offset},
        )
        self._metrics.p2p_fallbacks.labels(why.reason).inc()

    def _disk_failed(self, digest: Digest, error: DiskError) -> None:
        logger.error(
            "disk error; the layer is not kept on this node: %s",
            error,
            extra={"digest": str(digest), "operation": error.operation},
        )
        self._metrics.disk_errors.labels(error.operation).inc()

    async def _read_cached(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        with self._peer.cache.pin(digest):
            for path, offset, length in self._peer.cache.ranges(digest, start, end):
                with on_disk("chunk_read"), open(path, "rb") as file:
                    position, stop = offset, offset + length
                    while position < stop:
                        data = await asyncio.to_thread(
                            os.pread, file.fileno(), min(CACHE_READ, stop - position), position
                        )
                        if not data:
                            raise OSError(errno.EIO, f"cached chunk file {path.name} is short")
                        position += len(data)
                        yield data

    def _registry_range(self, blob: BlobRequest) -> RegistryRange:
        """The registry's bytes of the blob with this client's credential, resumed after failures:
        every registry read of the swarm path (a fallback, a stalled chunk's refill, this node's
        own chunk download) goes through it."""
        headers = list(blob.request.headers.items())
        return lambda start, end: self._upstream.read_range(blob.registry, blob.path_qs, headers, start, end)

    # fetches: one per blob, whoever asks

    async def _fetch(self, blob: BlobRequest, registry: RegistryRange) -> BlobFetch:
        fetch = self._fetches.get(blob.digest)
        if fetch is not None:
            fetch.registry = registry
            return fetch
        joining = self._joining.get(blob.digest)
        if joining is None:
            joining = spawn(self._join(blob, registry), name=f"join-{blob.digest.hex[:12]}")
            self._joining[blob.digest] = joining
            joining.add_done_callback(lambda _: self._joining.pop(blob.digest, None))
        joined = await asyncio.shield(joining)
        if isinstance(joined, Unavailable):
            raise joined
        return joined

    async def _join(self, blob: BlobRequest, registry: RegistryRange) -> BlobFetch | Unavailable:
        """Join the blob's swarm once and start fetching it; `Unavailable` when the tracker says
        no or is away, returned as a value: every waiter raises it, and no task "crashed"."""
        key = new_key()
        authorization = blob.request.headers.get("Authorization")
        try:
            swarm = await self._tracker.join(
                blob.digest, blob.registry.host, blob.repository, self._node, make_csr(key), authorization
            )
            credentials = Credentials(swarm.cert.encode(), key_pem(key), swarm.announce)
            chunked = await self._peer.open(blob.digest, swarm.size, swarm.chunk_size, credentials)
        except DiskError as exc:
            self._disk_failed(blob.digest, exc)
            return Unavailable("disk_error", str(exc))
        except (TrackerUnavailable, TrackerRefused, PeerError) as exc:
            return Unavailable("no_swarm", f"no swarm: {exc}")
        config = self._config
        fetch = BlobFetch(
            swarm, chunked, self._tracker, registry, config.stall_timeout, config.origin_connections
        )
        self._fetches[blob.digest] = fetch
        await fetch.start()
        watcher = spawn(self._until_cached(fetch, blob), name=f"watch-{blob.digest.hex[:12]}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return fetch

    async def _until_cached(self, fetch: BlobFetch, blob: BlobRequest) -> None:
        """Finish a fetch: once its blob is complete and verified it is served from the cache and
        seeded; wrong bytes are reported and dropped, so the next pull fetches it again; a blob
        this node failed (its disk, say) is dropped already, and its readers are told."""
        failure: PeerError | None = None
        try:
            await fetch.blob.completed()
        except DigestMismatch:
            await self._wrong_bytes(blob)
            return
        except DiskError as exc:
            self._disk_failed(blob.digest, exc)
            failure = exc
        except PeerError as exc:
            logger.warning("blob not completed: %s", exc, extra={"digest": str(blob.digest)})
            failure = exc
        if self._fetches.get(blob.digest) is fetch:
            del self._fetches[blob.digest]
        await fetch.close(failure)

    async def _wrong_bytes(self, blob: BlobRequest) -> None:
        """The chunks this node holds do not make the blob: tell the tracker (which checks the
        claim against the registry itself and withdraws the chunks that are wrong), and forget
        them all."""
        fetch = self._fetches.pop(blob.digest, None)
        logger.error("blob does not match its digest; reporting it", extra={"digest": str(blob.digest)})
        if fetch is not None:
            await fetch.close(DigestMismatch(f"{blob.digest}: the bytes do not match"))
            with contextlib.suppress(TrackerUnavailable, TrackerRefused):
                withdrawn = await self._tracker.report(
                    blob.digest, "digest_mismatch", fetch.swarm.key, blob.registry.host,
                    blob.repository, blob.request.headers.get("Authorization"),
                )  # fmt: skip
                logger.warning(
                    "the tracker withdrew chunks %s", withdrawn, extra={"digest": str(blob.digest)}
                )
        await self._forget(blob.digest)

    async def _forget(self, digest: Digest) -> None:
        """Stop seeding the blob and delete it, cached or not, now: bytes that changed on disk
        since they were verified, or a disk that cannot read them. Readers in flight find it
        gone; the next pull fetches it again."""
        await self._peer.drop(digest)
        if digest in self._peer.cache:
            await asyncio.to_thread(self._peer.cache.delete, digest)
