"""A real `python -m proxy` process: lifecycle, CA files, refusals, tunnels, relays, redirects."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography import x509
from lab.pki import LOOPBACK, REGISTRY_NAME, issue_server_files, new_lab_ca, write_ca
from lab.services import free_port, python_env
from yarl import URL

from common.certs import CertificateAuthority
from common.errors import Handler
from tests.proxy.harness import RunningNode, node_config, run_node

HEX = "b" * 64
BLOB_PATH = f"/v2/team/app/blobs/sha256:{HEX}"
BLOB = bytes(range(256)) * 4096  # 1 MiB
SLOW_PATH = f"/v2/team/app/blobs/sha256:{'c' * 64}"
SLOW_CHUNKS = 10
BROKEN_PATH = f"/v2/team/app/blobs/sha256:{'e' * 64}"


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]


@dataclass
class FakeServer:
    """An aiohttp server that records what reached it; `url` once started."""

    app: web.Application
    ssl: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{LOOPBACK}:{self.port}"

    async def __aenter__(self) -> FakeServer:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.seen.append(Seen(request.method, request.raw_path, dict(request.headers)))
            return await handler(request)

        self.app.middlewares.append(record)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, LOOPBACK, 0, ssl_context=self.ssl)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def server_context(ca: CertificateAuthority, directory: Path, *names: str) -> ssl.SSLContext:
    tls = issue_server_files(ca, directory, names[0].replace(":", "_"), *names)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    return context


def node_client_context(node: RunningNode, host: str) -> ssl.SSLContext:
    """What dockerd does: trust the node CA for this registry host."""
    return ssl.create_default_context(cafile=str(node.ca_file(host)))


async def raw_exchange(node: RunningNode, data: bytes) -> bytes:
    host, port = node.proxy_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def oci_error(response: bytes) -> tuple[int, str, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower()
    (error,) = json.loads(body)["errors"]
    return status, error["code"], error["message"]


@dataclass
class Fake:
    registry: FakeServer
    storage: FakeServer


@pytest_asyncio.fixture
async def fake(test_ca: CertificateAuthority, tmp_path: Path) -> AsyncIterator[Fake]:
    """A TLS 'registry' named registry.shoal.test whose blob GETs redirect to a storage host."""
    storage_app = web.Application()

    async def storage_blob(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BLOB, headers={"Docker-Content-Digest": f"sha256:{HEX}"})

    storage_app.router.add_get("/data", storage_blob)
    storage = FakeServer(storage_app, server_context(test_ca, tmp_path / "storage", LOOPBACK))

    async def blob(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(
                headers={"Content-Length": str(len(BLOB)), "Docker-Content-Digest": f"sha256:{HEX}"}
            )
        raise web.HTTPTemporaryRedirect(f"{storage.url}/data?sig=s3cret")

    async def other(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.json_response({"path_qs": request.raw_path, "body": len(body)}, headers={"X-Echo": "1"})

    async def slow_blob(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(SLOW_CHUNKS * len(BLOB))})
        await response.prepare(request)
        for _ in range(SLOW_CHUNKS):
            await response.write(BLOB)
            await asyncio.sleep(0.2)
        await response.write_eof()
        return response

    async def broken_blob(request: web.Request) -> web.StreamResponse:
        if "Range" in request.headers:  # the node asks for the rest: refused, so it gives up at once
            raise web.HTTPNotFound()
        response = web.StreamResponse(headers={"Content-Length": str(2 * len(BLOB))})
        await response.prepare(request)
        await response.write(BLOB)
        assert request.transport is not None
        request.transport.abort()  # the registry dies half way through the layer
        return response

    app = web.Application()
    app.router.add_route("*", BLOB_PATH, blob)
    app.router.add_get(BROKEN_PATH, broken_blob)
    app.router.add_get(SLOW_PATH, slow_blob)
    app.router.add_route("*", "/{tail:.*}", other)
    registry = FakeServer(app, server_context(test_ca, tmp_path / "fake", REGISTRY_NAME, LOOPBACK))
    async with storage, registry:
        yield Fake(registry, storage)


def fake_entry(registry: FakeServer, ca: Path) -> dict[str, Any]:
    return {"host": f"{REGISTRY_NAME}:{registry.port}", "url": registry.url, "ca": str(ca)}


@pytest.fixture
def test_ca_file(test_ca: CertificateAuthority, tmp_path: Path) -> Path:
    path = tmp_path / "test-ca.pem"
    write_ca(test_ca, path)
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_ca_file_lifecycle(tmp_path: Path, signum: int) -> None:
    host = "registry.shoal.test:5000"
    operator_dir = tmp_path / "certs.d" / host
    operator_dir.mkdir(parents=True)
    (operator_dir / "ca.crt").write_bytes(b"operator CA\n")
    config = node_config(tmp_path, [{"host": host}, {"host": "other.shoal.test:443"}])
    async with run_node(tmp_path, config) as node:
        cert = x509.load_pem_x509_certificate(node.ca_file(host).read_bytes())
        assert x509.load_pem_x509_certificate(node.ca_file("other.shoal.test").read_bytes()) == cert
        async with aiohttp.ClientSession() as session, session.get(f"{node.admin_url}/status") as response:
            status = await response.json()
        assert status["state"] == "serving"
        assert [r["host"] for r in status["registries"]] == [host, "other.shoal.test:443"]
        assert "shoal_blob_bytes_total" in status["counters"]
        assert await node.stop(signum) == 0
    assert not node.ca_file(host).exists()
    assert sorted(p.name for p in operator_dir.iterdir()) == ["ca.crt"]
    assert (operator_dir / "ca.crt").read_bytes() == b"operator CA\n"
    assert sorted(p.name for p in (tmp_path / "certs.d").iterdir()) == [host]


async def test_refuses_to_start_on_a_non_loopback_listen(tmp_path: Path) -> None:
    config = node_config(tmp_path, [{"host": "r.shoal.test:5000"}], listen="0.0.0.0:65001")
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps(config))
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", "--config", str(path)],
        env=python_env(), capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert b"listen: must be a loopback address" in result.stderr
    assert not (tmp_path / "certs.d").exists()


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "BAD_REQUEST"),
        (b"hello\r\n\r\n", 400, "BAD_REQUEST"),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "BAD_REQUEST"),
        (b"CONNECT nowhere HTTP/1.1\r\n\r\n", 400, "BAD_REQUEST"),
        (b"CONNECT a:1 HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n", 400, "BAD_REQUEST"),
        (b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 403, "DENIED"),
        (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n", 502, "BAD_GATEWAY"),
    ],
    ids=["tls-hello", "garbage", "origin-form", "bad-target", "huge-head", "open-proxy", "unreachable"],
)
async def test_refusals_are_oci_errors(tmp_path: Path, data: bytes, status: int, code: str) -> None:
    async with run_node(tmp_path, node_config(tmp_path, [])) as node:
        got_status, got_code, message = oci_error(await raw_exchange(node, data))
        assert (got_status, got_code) == (status, code), message
        assert node.process.poll() is None
        async with aiohttp.ClientSession() as session, session.get(f"{node.admin_url}/healthz") as response:
            assert response.status == 200


async def test_other_hosts_are_tunnelled_not_decrypted(tmp_path: Path) -> None:
    """The client sees the tunnelled server's own certificate, never one from the node CA."""
    own_ca = new_lab_ca()
    echo_context = server_context(own_ca, tmp_path / "echo", "auth.shoal.test")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    echo_server = await asyncio.start_server(echo, LOOPBACK, 0, ssl=echo_context)
    echo_port = echo_server.sockets[0].getsockname()[1]
    try:
        async with run_node(
            tmp_path, node_config(tmp_path, [{"host": f"{REGISTRY_NAME}:{echo_port}"}])
        ) as node:
            host, port = node.proxy_url.removeprefix("http://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: 127.0.0.1:{echo_port}\r\n\r\n".encode()
            )
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
            client = ssl.create_default_context()
            client.load_verify_locations(cadata=own_ca.cert_pem.decode())
            await writer.start_tls(client, server_hostname="auth.shoal.test")
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            issuer = x509.load_der_x509_certificate(der).issuer
            assert issuer == x509.load_pem_x509_certificate(own_ca.cert_pem).subject
            payload = bytes(range(256)) * 1000
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
    finally:
        echo_server.close()


async def test_relay_and_blob_redirects(fake: Fake, test_ca_file: Path, tmp_path: Path) -> None:
    entry = fake_entry(fake.registry, test_ca_file)
    async with run_node(tmp_path, node_config(tmp_path, [entry])) as node:
        trust = node_client_context(node, entry["host"])
        base = f"https://{entry['host']}"
        auth = {"Authorization": "Bearer dockerd-token"}
        async with aiohttp.ClientSession(skip_auto_headers=["Accept-Encoding", "User-Agent"]) as session:
            # Anything else: path and query unchanged, Authorization passed, body streamed up and down.
            url = f"{base}/v2/team/app/blobs/uploads/abc?digest=sha256%3A{HEX}&x=%2F"
            async with session.put(
                URL(url, encoded=True), data=b"x" * 1000, headers=auth, proxy=node.proxy_url, ssl=trust
            ) as resp:
                assert resp.status == 200 and resp.headers["X-Echo"] == "1"
                assert await resp.json() == {"path_qs": url.removeprefix(base), "body": 1000}
            seen = fake.registry.seen[-1]
            assert seen.headers["Authorization"] == "Bearer dockerd-token"
            assert seen.headers["Host"] == entry["host"]
            assert "Accept-Encoding" not in seen.headers and "User-Agent" not in seen.headers

            # A blob GET follows the storage redirect itself, without the credential.
            async with session.get(
                f"{base}{BLOB_PATH}", headers=auth, proxy=node.proxy_url, ssl=trust
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Docker-Content-Digest"] == f"sha256:{HEX}"
                assert resp.content_length == len(BLOB)
                assert await resp.read() == BLOB
            storage_seen = fake.storage.seen[-1]
            assert storage_seen.path_qs == "/data?sig=s3cret"
            assert "Authorization" not in storage_seen.headers
            assert storage_seen.headers["Host"] == f"{LOOPBACK}:{fake.storage.port}"

            async with session.head(
                f"{base}{BLOB_PATH}", headers=auth, proxy=node.proxy_url, ssl=trust
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == str(len(BLOB))
        assert await node.metric("shoal_blob_bytes_total", source="upstream") == len(BLOB)
        assert await node.metric("shoal_proxy_requests_total", kind="blob", status="200") == 2
        assert await node.metric("shoal_proxy_requests_total", kind="other", status="200") == 1


async def test_registry_unreachable_is_502(tmp_path: Path, test_ca_file: Path) -> None:
    host = f"{REGISTRY_NAME}:{free_port()}"
    entry = {"host": host, "url": f"https://{LOOPBACK}:{free_port()}", "ca": str(test_ca_file)}
    async with run_node(tmp_path, node_config(tmp_path, [entry])) as node:
        trust = node_client_context(node, host)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://{host}/v2/", proxy=node.proxy_url, ssl=trust) as response,
        ):
            assert response.status == 502
            body = await response.json()
        assert body["errors"][0]["code"] == "BAD_GATEWAY"


async def test_registry_certificate_is_verified_for_its_name(fake: Fake, tmp_path: Path) -> None:
    """Upstream TLS is verified: a registry whose certificate the node cannot verify is a 502."""
    other_ca = tmp_path / "other-ca.pem"
    write_ca(new_lab_ca(), other_ca)
    entry = fake_entry(fake.registry, other_ca)
    async with run_node(tmp_path, node_config(tmp_path, [entry])) as node:
        trust = node_client_context(node, entry["host"])
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://{entry['host']}/v2/", proxy=node.proxy_url, ssl=trust) as response,
        ):
            assert response.status == 502
    assert fake.registry.seen == []


async def test_plain_http_only_for_insecure_registries(tmp_path: Path) -> None:
    async def other(request: web.Request) -> web.StreamResponse:
        return web.json_response({"path_qs": request.raw_path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", other)
    async with FakeServer(app) as plain:
        host = f"plain.shoal.test:{plain.port}"
        entries: list[dict[str, Any]] = [
            {"host": host, "url": plain.url, "insecure": True},
            {"host": "tls.shoal.test:5000"},
        ]
        async with (
            run_node(tmp_path, node_config(tmp_path, entries)) as node,
            aiohttp.ClientSession() as session,
        ):
            headers = {"Authorization": "Basic abc", "Proxy-Authorization": "Basic proxy"}
            async with session.get(f"http://{host}/v2/?n=1", headers=headers, proxy=node.proxy_url) as resp:
                assert resp.status == 200
                assert await resp.json() == {"path_qs": "/v2/?n=1"}
            seen = plain.seen[-1]
            assert seen.headers["Authorization"] == "Basic abc"
            assert "Proxy-Authorization" not in seen.headers
            async with session.get("http://tls.shoal.test:5000/v2/", proxy=node.proxy_url) as resp:
                assert resp.status == 403
                assert (await resp.json())["errors"][0]["code"] == "DENIED"


async def test_stop_lets_responses_in_flight_finish(fake: Fake, test_ca_file: Path, tmp_path: Path) -> None:
    entry = fake_entry(fake.registry, test_ca_file)
    async with run_node(tmp_path, node_config(tmp_path, [entry])) as node:
        trust = node_client_context(node, entry["host"])
        url = f"https://{entry['host']}{SLOW_PATH}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, proxy=node.proxy_url, ssl=trust) as resp,
        ):
            assert resp.status == 200
            first = await resp.content.readexactly(len(BLOB))
            node.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            host, port = node.proxy_url.removeprefix("http://").rsplit(":", 1)
            with pytest.raises(ConnectionRefusedError):  # no longer accepting
                await asyncio.open_connection(host, int(port))
            assert node.ca_file(entry["host"]).exists()  # still needed by the response in flight
            rest = await resp.read()
        assert len(first) + len(rest) == SLOW_CHUNKS * len(BLOB)
        assert await asyncio.to_thread(node.process.wait, 20) == 0
        assert not node.ca_file(entry["host"]).exists()


async def test_registry_failing_mid_body_cuts_the_client_off(
    fake: Fake, test_ca_file: Path, tmp_path: Path
) -> None:
    """Headers are out already: the client must see a short body, never a second response.
    (Retries with backoff are tested in process, in test_upstream.py.)"""
    entry = fake_entry(fake.registry, test_ca_file)
    async with run_node(tmp_path, node_config(tmp_path, [entry])) as node:
        trust = node_client_context(node, entry["host"])
        url = f"https://{entry['host']}{BROKEN_PATH}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, proxy=node.proxy_url, ssl=trust) as resp,
        ):
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert await node.metric("shoal_proxy_upstream_errors_total") == 1
        assert await node.metric("shoal_registry_retries_total") == 1
        assert node.process.poll() is None


async def test_concurrent_blob_pulls(fake: Fake, test_ca_file: Path, tmp_path: Path) -> None:
    """dockerd pulls three layers at a time, each on a new connection with its own handshake."""
    entry = fake_entry(fake.registry, test_ca_file)
    async with run_node(tmp_path, node_config(tmp_path, [entry])) as node:
        trust = node_client_context(node, entry["host"])
        connector = aiohttp.TCPConnector(force_close=True, limit=0)  # like dockerd: no keep-alive

        async with aiohttp.ClientSession(connector=connector) as session:

            async def pull() -> bytes:
                url = f"https://{entry['host']}{BLOB_PATH}"
                async with session.get(url, proxy=node.proxy_url, ssl=trust) as resp:
                    assert resp.status == 200
                    return await resp.read()

            bodies = await asyncio.gather(*(pull() for _ in range(24)))
        assert all(body == BLOB for body in bodies)
        assert await node.metric("shoal_blob_bytes_total", source="upstream") == 24 * len(BLOB)
