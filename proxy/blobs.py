"""Where layer blobs come from: the seam between the proxy and the peer-to-peer path.

The proxy hands every blob GET/HEAD (`/v2/<repo>/blobs/sha256:<hex>`) of a configured registry
to a `BlobSource`. The default one streams from the registry; the P2P source goes in its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from common.ids import Digest, Repository
from proxy.config import NodeRegistry
from proxy.metrics import NodeMetrics
from proxy.upstream import Upstream, blob_span, relay


@dataclass(frozen=True)
class BlobRequest:
    registry: NodeRegistry
    repository: Repository
    digest: Digest
    request: web.Request  # dockerd's request: method, Authorization, Range, raw path

    @property
    def path_qs(self) -> str:
        """The request target as the client sent it, to forward to the registry unchanged."""
        return self.request.rel_url.raw_path_qs


class BlobSource(Protocol):
    async def serve(self, blob: BlobRequest) -> web.StreamResponse:
        """Answer one blob GET or HEAD.

        Prepare the response on `blob.request` as soon as status and headers are known (status,
        `Content-Length`, `Docker-Content-Digest`), then stream the body and return the prepared
        response. Raise `common.errors.ApiError` only before preparing; after that, raise
        `proxy.upstream.UpstreamBroken` to cut the connection (the client sees a short body).
        Count body bytes sent in `shoal_blob_bytes_total{source}`.
        """
        ...


class UpstreamBlobSource:
    """Every blob straight from the registry, following storage redirects itself. The registry's
    answer goes to the client as it is (a refusal with its own status and error body); a layer's
    body is resumed from the offset reached when the registry fails part way."""

    def __init__(self, upstream: Upstream, metrics: NodeMetrics) -> None:
        self._upstream = upstream
        self._counted = metrics.blob_bytes.labels("upstream").inc

    async def serve(self, blob: BlobRequest) -> web.StreamResponse:
        request = blob.request
        headers = request.headers.items()
        async with self._upstream.request(
            blob.registry, request.method, blob.path_qs, headers, follow_redirects=True
        ) as response:
            span = blob_span(response) if request.method == "GET" else None
            body = None
            if span is not None:
                body = self._upstream.read_range(blob.registry, blob.path_qs, headers, *span, response)
            layer_bytes = response.status in (200, 206)
            return await relay(request, response, self._counted if layer_bytes else None, body)
