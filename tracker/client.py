"""The small client other components use to talk to the tracker (never tracker internals)."""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp

from common.ids import Digest, NodeId, Repository

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

    async def relay(self, path: str, query: str) -> bytes:
        """Send a BitTorrent `/announce` or `/scrape` on for a local peer and return the bencoded
        answer: libtorrent cannot be given `tracker_ca`, the node's own client can."""
        try:
            async with self._session.get(f"{self._url}{path}?{query}", ssl=self._ssl) as resp:
                if resp.status != 200:
                    raise TrackerUnavailable(f"GET {path}: tracker answered {resp.status}")
                return await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TrackerUnavailable(f"GET {path}: {exc.__class__.__name__}: {exc}") from None

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
