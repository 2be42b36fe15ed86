"""The registry side of the proxy: one pooled HTTP client, verified TLS, streamed relays.

A registry is reached at its `url` but its certificate is checked for the name in `host`, the
name dockerd would have verified had it connected itself (`server_hostname`): `url` only says
where to connect, like curl's --connect-to. Redirects are followed only when asked (blob
fetches); a redirect to another host goes without `Authorization`, as dockerd itself does.
aiohttp's exceptions are translated here and nowhere else.

A layer's bytes are read by `Upstream.read_range`, on the direct path and the swarm's alike: a
registry that drops the connection or answers 5xx mid-blob is asked again for the rest, from the
offset reached, before the client's response is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from common.errors import BAD_GATEWAY, ApiError
from common.tls import client_ssl_context
from proxy.config import NodeRegistry
from proxy.metrics import NodeMetrics
from proxy.routing import forward_headers, origin_of, without

logger = logging.getLogger(__name__)

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
CHUNK = 256 * 1024
# Connecting is quick or broken; a registry that sends nothing for minutes mid-layer is broken.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
# aiohttp would add these when the client did not send them, changing what the registry answers
# (an unasked-for Accept-Encoding gets a gzip body that dockerd never asked for).
NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# A registry that fails mid-blob is asked for the rest up to RETRIES times in a row without a byte
# in between, after RETRY_FIRST s, then twice as long each time, with jitter so that nodes that
# lost the same registry do not come back in step. Bytes reset the count: a long layer behind a
# load balancer that cuts connections every few minutes still arrives.
RETRIES = 3
RETRY_FIRST = 0.5
READ_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")


class UpstreamBroken(ConnectionError):
    """The registry failed after the response had started: the client connection is cut."""


class _Interrupted(Exception):
    """The registry failed in a way that asking again may cure."""


@dataclass(frozen=True)
class _Route:
    ssl: ssl.SSLContext | bool
    server_hostname: str | None
    headers: list[tuple[str, str]]


class Upstream:
    """Requests to configured registries (and where they redirect), over one connection pool."""

    def __init__(
        self, session: aiohttp.ClientSession, registries: Iterable[NodeRegistry], metrics: NodeMetrics
    ) -> None:
        self._session = session
        self._ssl = {r.host: client_ssl_context(str(r.ca) if r.ca else None) for r in registries}
        self._retries = metrics.registry_retries

    def _route(self, registry: NodeRegistry, url: URL, headers: list[tuple[str, str]]) -> tuple[URL, _Route]:
        context = self._ssl[registry.host]
        own = {
            origin_of(registry.base_url),
            origin_of(f"https://{registry.host}"),
            origin_of(f"http://{registry.host}"),
        }
        if origin_of(str(url)) in own:
            # The registry itself, however it spelled its own URL (Location headers are built
            # from the Host header dockerd sent): connect to `url`, verify the name in `host`.
            target = URL(registry.base_url + url.raw_path_qs, encoded=True)
            secure = target.scheme == "https"
            return target, _Route(context if secure else False, registry.name if secure else None, headers)
        # Another host (storage behind a redirect): no credential, its own Host header.
        return url, _Route(context, None, without(headers, "Authorization", "Host"))

    @contextlib.asynccontextmanager
    async def request(
        self,
        registry: NodeRegistry,
        method: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterator[bytes] | None = None,
        *,
        follow_redirects: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send `method path_qs` to the registry; the response's body is not read yet.

        Raises `ApiError(BAD_GATEWAY)` when the registry cannot be reached.
        """
        url = URL(registry.base_url + path_qs, encoded=True)
        sent = forward_headers(headers)
        for _hop in range(MAX_REDIRECTS + 1):
            url, route = self._route(registry, url, sent)
            try:
                response = await self._session.request(
                    method,
                    url,
                    headers=CIMultiDict(route.headers),
                    data=body,
                    ssl=route.ssl,
                    server_hostname=route.server_hostname,
                    allow_redirects=False,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                logger.warning(
                    "registry unreachable",
                    extra={"registry": registry.host, "host": url.host, "error": repr(exc)},
                )
                raise ApiError(
                    BAD_GATEWAY, f"registry {registry.host} unreachable: {exc.__class__.__name__}"
                ) from None
            location = response.headers.get("Location")
            if not (follow_redirects and response.status in REDIRECTS and location and body is None):
                break
            response.release()
            url = url.join(URL(location, encoded=True))
            sent = route.headers
            if response.status == 303:
                method = "GET"
        else:
            response.release()
            raise ApiError(BAD_GATEWAY, f"registry {registry.host}: more than {MAX_REDIRECTS} redirects")
        try:
            yield response
        finally:
            response.release()

    async def read_range(
        self,
        registry: NodeRegistry,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        start: int,
        end: int,
        opened: aiohttp.ClientResponse | None = None,
    ) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the blob at `path_qs`, asked for with the client's `headers` (its
        credential), each time `Range: bytes=<offset>-<end-1>`.

        `opened` is a response already under way for exactly [start, end): the client's own
        request, whose headers went out already. After a dropped connection, a timeout or a 5xx
        the rest is asked for again (see RETRIES); `UpstreamBroken`, naming the offset, once the
        retries are spent or when the registry refuses (a 4xx: an expired credential, say).
        """
        asked = without(headers, "Range")
        position, failures = start, 0
        while position < end:
            try:
                async for data in self._attempt(registry, path_qs, asked, position, end, opened):
                    position += len(data)
                    failures = 0
                    yield data
            except _Interrupted as exc:
                failures += 1
                if failures > RETRIES:
                    raise UpstreamBroken(
                        f"registry {registry.host}: {exc}; cut at offset {position} after {RETRIES} retries"
                    ) from None
                await self._pause(registry, path_qs, position, failures, exc)
            opened = None

    async def _attempt(
        self,
        registry: NodeRegistry,
        path_qs: str,
        headers: list[tuple[str, str]],
        start: int,
        end: int,
        opened: aiohttp.ClientResponse | None,
    ) -> AsyncIterator[bytes]:
        """[start, end) from `opened`, else from one `Range` request."""
        if opened is not None:
            async for data in _body(opened, 0, end - start):
                yield data
            return
        ranged = [*headers, ("Range", f"bytes={start}-{end - 1}")]
        try:
            async with self.request(registry, "GET", path_qs, ranged, follow_redirects=True) as response:
                if response.status >= 500:
                    raise _Interrupted(f"registry answered {response.status}")
                if response.status not in (200, 206):
                    raise UpstreamBroken(f"registry {registry.host}: {response.status} at offset {start}")
                skip = start if response.status == 200 else 0  # a registry that ignored Range
                async for data in _body(response, skip, end - start):
                    yield data
        except ApiError as exc:  # unreachable (logged by `request`)
            raise _Interrupted(exc.message) from None

    async def _pause(
        self, registry: NodeRegistry, path_qs: str, offset: int, failures: int, why: _Interrupted
    ) -> None:
        delay = RETRY_FIRST * 2 ** (failures - 1) * random.uniform(0.5, 1.5)
        logger.warning(
            "registry failed mid-blob; the rest is asked for again in %.1f s: %s",
            delay,
            why,
            extra={
                "registry": registry.host,
                "path": path_qs.partition("?")[0],
                "offset": offset,
                "retry": failures,
            },
        )
        self._retries.inc()
        await asyncio.sleep(delay)


async def _body(response: aiohttp.ClientResponse, skip: int, length: int) -> AsyncIterator[bytes]:
    """`length` bytes of a response's body after its first `skip`; `_Interrupted` when the body
    breaks off or ends short."""
    try:
        async for data in response.content.iter_chunked(CHUNK):
            wanted = data[skip : skip + length]
            skip = max(0, skip - len(data))
            length -= len(wanted)
            if wanted:
                yield wanted
            if not length:
                return
    except READ_ERRORS as exc:
        raise _Interrupted(repr(exc)) from None
    raise _Interrupted(f"the body ended {length} bytes short")


def blob_span(response: aiohttp.ClientResponse) -> tuple[int, int] | None:
    """The [start, end) of the blob a 200 or 206 response says it carries, when it says so: what
    a resumed request asks for."""
    length = response.content_length
    if response.status == 200:
        return None if length is None else (0, length)
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
    if response.status != 206 or not match:
        return None
    start, end = int(match[1]), int(match[2]) + 1
    return (start, end) if start < end and length in (None, end - start) else None


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    on_bytes: Callable[[int], None] | None = None,
    body: AsyncIterator[bytes] | None = None,
) -> web.StreamResponse:
    """Send the registry's status and headers to the client, then its body (or `body`), chunk by
    chunk as they arrive."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in forward_headers(upstream.headers.items()):
        response.headers.add(name, value)
    await response.prepare(request)
    async for chunk in body or _content(request, upstream):
        await response.write(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
    await response.write_eof()
    return response


async def _content(request: web.Request, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_chunked(CHUNK):
            yield chunk
    except READ_ERRORS as exc:
        logger.warning("registry response broke off", extra={"path": request.path, "error": repr(exc)})
        raise UpstreamBroken(str(exc)) from None


@contextlib.asynccontextmanager
async def open_upstream(registries: Iterable[NodeRegistry], metrics: NodeMetrics) -> AsyncIterator[Upstream]:
    connector = aiohttp.TCPConnector(limit=256, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=TIMEOUT,
        auto_decompress=False,  # bodies pass through as the registry sent them
        skip_auto_headers=NO_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
        trust_env=False,  # the node's own environment may name a proxy: never loop through it
    ) as session:
        yield Upstream(session, registries, metrics)
