"""The proxy listener: dockerd's HTTPS_PROXY.

Each connection starts with one request head, read here; `routing.decide_connection` says what
to do with it. CONNECT to a configured registry is answered 200 and TLS is terminated with a
leaf from the node CA; the HTTP requests inside are served by an aiohttp server for that
registry. CONNECT elsewhere becomes a byte pipe. An absolute-URI request to a registry
configured insecure is served by the same aiohttp server over plain HTTP, one request per
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import cast

from aiohttp import web

from common import errors
from common.errors import ApiError, Handler
from common.logs import access_log_middleware
from common.tasks import spawn
from proxy.blobs import BlobRequest, BlobSource
from proxy.ca import LeafContexts
from proxy.config import NodeConfig, NodeRegistry, split_host_port
from proxy.metrics import NodeMetrics
from proxy.routing import (
    MAX_HEAD,
    Action,
    BadRequest,
    Decision,
    Kind,
    classify,
    client_allowed,
    decide_connection,
    parse_head,
)
from proxy.upstream import Upstream, UpstreamBroken, relay

logger = logging.getLogger(__name__)

CONNECTED = b"HTTP/1.1 200 Connection established\r\n\r\n"
HANDSHAKE_TIMEOUT = 15.0
CONNECT_TIMEOUT = 30.0
HEAD_TIMEOUT = 30.0  # a client that connects and says nothing does not hold a socket for long
_ERROR_CODES = {400: errors.BAD_REQUEST, 403: errors.DENIED, 502: errors.BAD_GATEWAY}


def error_bytes(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 error response with the OCI body, for connections not yet handed over."""
    body = errors.error_body(_ERROR_CODES[status].code, message)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class RegistryHandler:
    """Serves the HTTP requests for one registry: blobs through the `BlobSource`, the rest as is."""

    def __init__(
        self, registry: NodeRegistry, upstream: Upstream, blobs: BlobSource, metrics: NodeMetrics
    ) -> None:
        self.registry = registry
        self._upstream = upstream
        self._blobs = blobs
        self._metrics = metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not request.secure:
            request.protocol.close()  # plain HTTP: closed after this response; the next one is decided anew
        what = classify(request.method, request.path)
        status = 0
        try:
            if what.kind is Kind.BLOB:
                assert what.repository is not None and what.digest is not None
                response = await self._blobs.serve(
                    BlobRequest(self.registry, what.repository, what.digest, request)
                )
            else:
                response = await self._forward(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.error.status
            if exc.error is errors.BAD_GATEWAY:
                self._metrics.upstream_errors.inc()
            raise
        except UpstreamBroken:
            self._metrics.upstream_errors.inc()
            raise
        finally:
            self._metrics.requests.labels(what.kind.value, str(status or "aborted")).inc()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = request.content.iter_chunked(64 * 1024) if request.body_exists else None
        async with self._upstream.request(
            self.registry, request.method, request.rel_url.raw_path_qs, request.headers.items(), body
        ) as response:
            return await relay(request, response)


@web.middleware
async def api_error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OCI error bodies for errors raised before a response started; anything later cuts the
    connection (aiohttp closes it when a handler fails after sending headers)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return errors.error_response(exc.error, exc.message, exc.headers)


def registry_app(handler: RegistryHandler) -> web.Application:
    app = web.Application(middlewares=[access_log_middleware, api_error_middleware])
    app.router.add_route("*", "/{path:.*}", handler.handle)
    return app


class _Pipe(asyncio.Protocol):
    """One direction's reader of a tunnel: what arrives on one transport is written to the other,
    with flow control (a full write buffer on one side pauses reading on the other)."""

    def __init__(self, tunnels: set[_Pipe]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.eof = False
        self._tunnels = tunnels
        tunnels.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.pause_reading()  # until the other side is linked

    def link(self, transport: asyncio.Transport, peer: _Pipe) -> None:
        self.transport, self.peer = transport, peer

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        assert self.peer is not None and self.peer.transport is not None
        if self.peer.eof or not self.peer.transport.can_write_eof():
            self.close()
            return False
        self.peer.transport.write_eof()  # half-close: the other direction may still carry data
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnels.discard(self)
        self.close()

    def close(self) -> None:
        for pipe in (self, self.peer):
            if pipe is not None and pipe.transport is not None:
                pipe.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Preamble(asyncio.Protocol):
    """Reads the first request head of a proxy connection, then hands the transport over."""

    def __init__(self, proxy: ProxyServer) -> None:
        self._proxy = proxy
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timeout: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._timeout = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._transport.abort)
        peer = transport.get_extra_info("peername")
        if not client_allowed(peer):
            self._proxy.metrics.connections.labels("refused").inc()
            logger.warning("refused a client that is not on loopback", extra={"remote": str(peer)})
            self._transport.write(error_bytes(403, "this proxy serves loopback clients only"))
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timeout is not None:
            self._timeout.cancel()

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        if self._transport.is_closing():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
        if end < 0:
            if len(self._buffer) >= MAX_HEAD:
                self._proxy.metrics.connections.labels("reject").inc()
                self._transport.pause_reading()
                self._transport.write(error_bytes(400, f"request head larger than {MAX_HEAD} bytes"))
                self._transport.close()
            return
        self._transport.pause_reading()
        if self._timeout is not None:
            self._timeout.cancel()
        head, rest = bytes(self._buffer[: end + 4]), bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        transport = self._transport
        spawn(self._proxy.dispatch(transport, head, rest), name="proxy-connection")


class ProxyServer:
    def __init__(
        self,
        config: NodeConfig,
        leaves: LeafContexts,
        upstream: Upstream,
        blobs: BlobSource,
        metrics: NodeMetrics,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._leaves = leaves
        self._handlers = {r.host: RegistryHandler(r, upstream, blobs, metrics) for r in config.registries}
        self._runners: dict[str, web.AppRunner] = {}
        self._tunnels: set[_Pipe] = set()
        self._dispatching: set[asyncio.Task[None]] = set()

    async def dispatch(self, transport: asyncio.Transport, raw: bytes, rest: bytes) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._dispatching.add(task)
        try:
            try:
                decision = decide_connection(parse_head(raw), self.config)
            except BadRequest as exc:
                decision = Decision(Action.REJECT, status=400, message=str(exc))
            self.metrics.connections.labels(decision.action.value).inc()
            logger.debug("proxy connection", extra={"action": decision.action.value, "host": decision.host})
            if decision.action is Action.TUNNEL:
                await self._tunnel(transport, decision.host, rest)
            elif decision.action is Action.INTERCEPT and decision.registry is not None:
                await self._intercept(transport, decision.registry, rest)
            elif decision.action is Action.PLAIN and decision.registry is not None:
                self._plain(transport, decision.registry, raw + rest)
            else:
                transport.write(error_bytes(decision.status, decision.message))
                transport.close()
        except Exception:
            logger.exception("proxy connection failed")
            transport.abort()
        finally:
            self._dispatching.discard(task)

    async def _intercept(self, transport: asyncio.Transport, registry: NodeRegistry, rest: bytes) -> None:
        if rest:  # a client must wait for our 200 before its TLS handshake (RFC 9110 9.3.6)
            transport.write(error_bytes(400, "data sent before the CONNECT was answered"))
            transport.close()
            return
        context = self._leaves.context(registry.name)
        protocol = self._protocol(registry)
        transport.write(CONNECTED)
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport, protocol, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # Most often the client does not trust the node CA for this host: say where it lives.
            logger.warning(
                "TLS handshake with client failed; does it trust %s/%s/shoal-node-ca.crt?",
                self.config.docker_certs_dir,
                registry.host,
                extra={"registry": registry.host, "error": repr(exc)},
            )
            transport.abort()
            return
        if tls is None:
            transport.abort()
            return
        protocol.connection_made(tls)

    def _protocol(self, registry: NodeRegistry) -> asyncio.Protocol:
        server = self._runners[registry.host].server
        assert server is not None, "serving() sets the runners up"
        return server()

    def _plain(self, transport: asyncio.Transport, registry: NodeRegistry, data: bytes) -> None:
        protocol = self._protocol(registry)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)
        transport.resume_reading()

    async def _tunnel(self, client: asyncio.Transport, host: str, rest: bytes) -> None:
        name, port = split_host_port(host)
        loop = asyncio.get_running_loop()
        client_pipe = _Pipe(self._tunnels)
        try:
            remote, remote_pipe = await asyncio.wait_for(
                loop.create_connection(lambda: _Pipe(self._tunnels), name.strip("[]"), port),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            self._tunnels.discard(client_pipe)
            logger.info("tunnel target unreachable", extra={"host": host, "error": repr(exc)})
            client.write(error_bytes(502, f"cannot connect to {host}"))
            client.close()
            return
        if client.is_closing():
            self._tunnels.discard(client_pipe)
            remote.close()
            return
        client_pipe.link(client, remote_pipe)
        remote_pipe.link(remote, client_pipe)
        client.set_protocol(client_pipe)
        client.write(CONNECTED)
        if rest:
            remote.write(rest)
        client.resume_reading()
        remote.resume_reading()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[asyncio.AbstractServer]:
        """Listen on `listen`; on exit stop accepting and let open connections finish within
        `shutdown_grace`, then cut what is left."""
        grace = float(self.config.shutdown_grace)
        for host, handler in self._handlers.items():
            runner = web.AppRunner(
                registry_app(handler), handle_signals=False, access_log=None, shutdown_timeout=grace
            )
            await runner.setup()
            self._runners[host] = runner
        bind_host, port = split_host_port(self.config.listen)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Preamble(self), bind_host.strip("[]"), port, backlog=1024)
        logger.info("proxy listening", extra={"listen": self.config.listen})
        try:
            yield server
        finally:
            server.close()
            await self._drain(grace)

    async def _drain(self, grace: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._dispatching:
            await asyncio.wait(set(self._dispatching), timeout=grace)
        await asyncio.gather(*(runner.cleanup() for runner in self._runners.values()))
        while self._tunnels and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for pipe in list(self._tunnels):
            pipe.abort()
        self._runners.clear()
