"""The small client other components use to talk to the tracker (never tracker internals)."""

from __future__ import annotations

import base64
import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp

from common import bencoding
from common.ids import Digest, InfoHash, NodeId, Repository

LEASE_HEADER = "Shoal-Lease"  # carries the origin lease token on PUT .../torrent


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
class JoinAnswer:
    role: str  # "leecher", "origin" or "wait"
    cert: str | None = None
    ca: str | None = None
    expires_at: int | None = None
    torrent: bytes | None = None  # leecher
    announce: str | None = None  # leecher
    lease: str | None = None  # origin
    lease_seconds: int | None = None  # origin
    retry_after: float | None = None  # wait
    origin_bytes: int | None = None  # wait: the origin's progress; None when nobody is fetching


@dataclass(frozen=True)
class Announced:
    peers: list[tuple[str, int]]
    interval: int


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
    ) -> JoinAnswer:
        body = {
            "registry": registry,
            "repository": str(repository),
            "node": str(node),
            "csr": csr_pem,
        }
        headers = {"Authorization": authorization} if authorization else {}
        answer = await self._call("POST", f"/v1/blobs/{digest}/join", json=body, headers=headers)
        torrent = answer.pop("torrent", None)
        return JoinAnswer(**answer, torrent=base64.b64decode(torrent) if torrent else None)

    async def progress(self, digest: Digest, lease: str, bytes_done: int) -> None:
        await self._call("POST", f"/v1/blobs/{digest}/progress", json={"lease": lease, "bytes": bytes_done})

    async def publish(self, digest: Digest, lease: str, metainfo: bytes) -> str:
        """Publish the origin's torrent; returns the announce URL to seed it with."""
        answer = await self._call(
            "PUT", f"/v1/blobs/{digest}/torrent", data=metainfo, headers={LEASE_HEADER: lease}
        )
        return str(answer["announce"])

    async def report(self, digest: Digest, reason: str, key: str, peer: str | None = None) -> None:
        body = {"reason": reason, "key": key} | ({"peer": peer} if peer else {})
        await self._call("POST", f"/v1/blobs/{digest}/report", json=body)

    async def announce(self, url: str, info_hash: InfoHash, port: int, left: int) -> Announced:
        """One BitTorrent announce (BEP 3, compact) to `url`, the announce URL a join or publish
        returned, over this client's verified TLS; the peers the tracker names."""
        query = f"&info_hash={quote_from_bytes(info_hash.raw)}&port={port}&left={left}&compact=1&numwant=50"
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
