"""The registry side of the proxy: one pooled HTTP client, verified TLS, streamed relays.

A registry is reached at its `url` but its certificate is checked for the name in `host`, the
name dockerd would have verified had it connected itself (`server_hostname`): `url` only says
where to connect, like curl's --connect-to. Redirects are followed only when asked (blob
fetches); a redirect to another host goes without `Authorization`, as dockerd itself does.
aiohttp's exceptions are translated here and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
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


class UpstreamBroken(ConnectionError):
    """The registry failed after the response had started: the client connection is cut."""


@dataclass(frozen=True)
class _Route:
    ssl: ssl.SSLContext | bool
    server_hostname: str | None
    headers: list[tuple[str, str]]


class Upstream:
    """Requests to configured registries (and where they redirect), over one connection pool."""

    def __init__(self, session: aiohttp.ClientSession, registries: Iterable[NodeRegistry]) -> None:
        self._session = session
        self._ssl = {r.host: client_ssl_context(str(r.ca) if r.ca else None) for r in registries}

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


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    on_bytes: Callable[[int], None] | None = None,
) -> web.StreamResponse:
    """Send the registry's status, headers and body to the client, chunk by chunk as they arrive."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in forward_headers(upstream.headers.items()):
        response.headers.add(name, value)
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        logger.warning("registry response broke off", extra={"path": request.path, "error": repr(exc)})
        raise UpstreamBroken(str(exc)) from None
    await response.write_eof()
    return response


@contextlib.asynccontextmanager
async def open_upstream(registries: Iterable[NodeRegistry]) -> AsyncIterator[Upstream]:
    connector = aiohttp.TCPConnector(limit=256, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=TIMEOUT,
        auto_decompress=False,  # bodies pass through as the registry sent them
        skip_auto_headers=NO_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
        trust_env=False,  # the node's own environment may name a proxy: never loop through it
    ) as session:
        yield Upstream(session, registries)
