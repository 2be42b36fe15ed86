"""The small client other components use to talk to the tracker (never tracker internals)."""

from __future__ import annotations

import base64
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote_from_bytes

import aiohttp

from common import bencoding
from common.ids import Digest, InfoHash, NodeId, Repository

A = TypeVar("A")

LEASE_HEADER = "Shoal-Lease"  # carries the chunk lease token on PUT .../chunks/<index>/torrent
# A sync may take its `wait` and then some: the tracker's own work and the network on top.
SYNC_MARGIN_SECONDS = 10


class TrackerUnavailable(Exception):
    """The tracker could not be reached or failed; callers go back to the registry."""


class TrackerRefused(Exception):
    """The tracker answered with an OCI error: `status` and `code` say why."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ChunkTorrent:
    index: int
    metainfo: bytes
    info_hash: str  # hex of the chunk torrent's truncated v2 info-hash


@dataclass(frozen=True)
class ChunkLease:
    """The right to fetch chunk `index` from the registry and publish its torrent; kept by
    `progress` with growing byte counts at least every `seconds`."""

    index: int
    token: str
    seconds: int


@dataclass(frozen=True)
class Swarm:
    """A join's answer: the blob-scoped peer certificate, the blob's announce URL and key (for the
    blob's swarm id), its chunk plan, its published chunks and the chunk leases this node holds."""

    cert: str
    ca: str
    expires_at: int
    announce: str
    key: str
    size: int
    chunk_size: int
    chunks: list[ChunkTorrent]
    leases: list[ChunkLease]


@dataclass(frozen=True)
class SyncAnswer:
    chunks: list[ChunkTorrent]  # published chunks the node did not list as known
    withdrawn: list[str]  # info hashes it listed that are no longer published
    leases: list[ChunkLease]  # every live lease it holds, new ones included


@dataclass(frozen=True)
class Announced:
    peers: list[tuple[str, int]]
    interval: int


def _decoded(call: str, decode: Callable[[], A]) -> A:
    """An answer of the expected shape, or `TrackerUnavailable`: a tracker that answers 200 with
    another shape is broken, and the node goes back to the registry."""
    try:
        return decode()
    except (KeyError, TypeError, ValueError) as exc:
        raise TrackerUnavailable(f"{call}: malformed answer: {exc.__class__.__name__}: {exc}") from None


def _typed(value: object, kind: type[A]) -> A:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _chunk_torrents(raw: object) -> list[ChunkTorrent]:
    return [
        ChunkTorrent(
            index=_typed(item["index"], int),
            metainfo=base64.b64decode(_typed(item["torrent"], str), validate=True),
            info_hash=_typed(item["info_hash"], str),
        )
        for item in _typed(raw, list)
    ]


def _chunk_leases(raw: object) -> list[ChunkLease]:
    return [
        ChunkLease(
            index=_typed(item["index"], int),
            token=_typed(item["token"], str),
            seconds=_typed(item["seconds"], int),
        )
        for item in _typed(raw, list)
    ]


def _compact_peers(raw: object, version: int) -> list[tuple[str, int]]:
    """Compact peers (BEP 23 for IPv4, BEP 7 for IPv6): address then 2-byte port, each."""
    if not isinstance(raw, bytes):
        return []
    width = 6 if version == 4 else 18
    return [
        (
            str(ipaddress.ip_address(raw[i : i + width - 2])),
            int.from_bytes(raw[i + width - 2 : i + width], "big"),
        )
        for i in range(0, len(raw) - width + 1, width)
    ]


class TrackerClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, ssl_context: ssl.SSLContext):
        self._session = session
        self._url = url.rstrip("/")
        self._ssl = ssl_context

    async def join(
        self,
        digest: Digest,
        registry: str,
        repository: Repository,
        node: NodeId,
        csr_pem: str,
        authorization: str | None,
    ) -> Swarm:
        body = {
            "registry": registry,
            "repository": str(repository),
            "node": str(node),
            "csr": csr_pem,
        }
        headers = {"Authorization": authorization} if authorization else {}
        answer = await self._call("POST", f"/v1/blobs/{digest}/join", json=body, headers=headers)
        return _decoded(
            "join",
            lambda: Swarm(
                cert=_typed(answer["cert"], str),
                ca=_typed(answer["ca"], str),
                expires_at=_typed(answer["expires_at"], int),
                announce=_typed(answer["announce"], str),
                key=_typed(answer["key"], str),
                size=_typed(answer["size"], int),
                chunk_size=_typed(answer["chunk_size"], int),
                chunks=_chunk_torrents(answer["chunks"]),
                leases=_chunk_leases(answer["leases"]),
            ),
        )

    async def sync(self, digest: Digest, key: str, known: list[str], wait: float) -> SyncAnswer:
        """Chunks published and withdrawn since `known`, and this node's leases; the tracker holds
        the call up to `wait` seconds until something is new."""
        body = {"key": key, "known": known, "wait": wait}
        timeout = aiohttp.ClientTimeout(total=wait + SYNC_MARGIN_SECONDS)
        answer = await self._call("POST", f"/v1/blobs/{digest}/sync", json=body, timeout=timeout)
        return _decoded(
            "sync",
            lambda: SyncAnswer(
                chunks=_chunk_torrents(answer["chunks"]),
                withdrawn=[_typed(h, str) for h in _typed(answer["withdrawn"], list)],
                leases=_chunk_leases(answer["leases"]),
            ),
        )

    async def progress(self, digest: Digest, lease_token: str, bytes_done: int) -> None:
        body = {"lease": lease_token, "bytes": bytes_done}
        await self._call("POST", f"/v1/blobs/{digest}/progress", json=body)

    async def publish_chunk(self, digest: Digest, index: int, lease_token: str, metainfo: bytes) -> str:
        """Publish the torrent of chunk `index`, made while holding its lease; its info hash (hex)."""
        answer = await self._call(
            "PUT", f"/v1/blobs/{digest}/chunks/{index}/torrent", data=metainfo,
            headers={LEASE_HEADER: lease_token},
        )  # fmt: skip
        return _decoded("publish", lambda: _typed(answer["info_hash"], str))

    async def report(
        self,
        digest: Digest,
        reason: str,
        key: str,
        registry: str,
        repository: Repository,
        authorization: str | None,
        peer: str | None = None,
    ) -> list[int]:
        """Report `digest_mismatch` (the tracker checks the published chunks against the registry,
        with this credential) or `bad_peer`; the indices of the chunks it withdrew."""
        body = {"reason": reason, "key": key, "registry": registry, "repository": str(repository)}
        headers = {"Authorization": authorization} if authorization else {}
        answer = await self._call(
            "POST", f"/v1/blobs/{digest}/report", json=body | ({"peer": peer} if peer else {}),
            headers=headers,
        )  # fmt: skip
        return _decoded("report", lambda: [_typed(i, int) for i in _typed(answer["withdrawn"], list)])

    async def announce(
        self, url: str, info_hash: InfoHash, port: int, left: int, uploaded: int = 0
    ) -> Announced:
        """One BitTorrent announce (BEP 3, compact) to `url`, the announce URL a join
        returned, over this client's verified TLS; the peers the tracker names. The tracker lists
        this node at the address the announce comes from, and names first the peers that serve
        (seeders, then those that uploaded)."""
        query = (
            f"&info_hash={quote_from_bytes(info_hash.raw)}&port={port}&left={left}&uploaded={uploaded}"
            "&compact=1&numwant=50"
        )
        try:
            async with self._session.get(url + query, ssl=self._ssl) as resp:
                body = await resp.read()
            reply = bencoding.decode(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TrackerUnavailable(f"announce: {exc.__class__.__name__}: {exc}") from None
        if not isinstance(reply, dict) or b"failure reason" in reply:
            reason = reply.get(b"failure reason", b"?") if isinstance(reply, dict) else b"not a dictionary"
            raise TrackerRefused(resp.status, "ANNOUNCE_FAILED", bytes(reason).decode(errors="replace"))
        peers = _compact_peers(reply.get(b"peers"), 4) + _compact_peers(reply.get(b"peers6"), 6)
        interval = reply.get(b"interval")
        return Announced(peers, interval if isinstance(interval, int) and interval > 0 else 30)

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with self._session.request(method, self._url + path, ssl=self._ssl, **kwargs) as resp:
                payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TrackerUnavailable(f"{method} {path}: {exc.__class__.__name__}: {exc}") from None
        if resp.status >= 500:
            raise TrackerUnavailable(f"{method} {path}: tracker answered {resp.status}")
        if resp.status >= 400:
            try:
                error = payload["errors"][0]
                raise TrackerRefused(resp.status, str(error["code"]), str(error["message"]))
            except (KeyError, IndexError, TypeError):
                raise TrackerRefused(resp.status, "UNKNOWN", "no error body") from None
        if not isinstance(payload, dict):
            raise TrackerUnavailable(f"{method} {path}: answer is not a JSON object")
        return payload
