"""A registry that fails part way through a layer: the node resumes from the offset reached.

The node's registry handler runs in process on the direct path (`UpstreamBlobSource`), in front
of a scripted fake registry; `Upstream.read_range`, which the swarm path reads the registry
with, is tested on its own as well.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from common.errors import error_body
from proxy import upstream as upstream_module
from proxy.blobs import UpstreamBlobSource
from proxy.config import NodeRegistry
from proxy.metrics import NodeMetrics
from proxy.server import RegistryHandler, registry_app
from proxy.upstream import RETRIES, Upstream, UpstreamBroken, open_upstream

BLOB = hashlib.sha256(b"layer").digest() * (2**20 // 32)  # 1 MiB
DIGEST = f"sha256:{hashlib.sha256(BLOB).hexdigest()}"
PATH = f"/v2/team/app/blobs/{DIGEST}"
TOKEN = "Bearer client-token"
CUT = 300_000  # where a dropping registry stops sending


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "RETRY_FIRST", 0.001)


@dataclass
class FakeRegistry:
    """Answers each blob GET with the next act of its script, the last one for good:
    `serve` (the range asked for, else the whole blob), `ignore` (the whole blob, whatever the
    Range), `drop@N` (like serve, but the connection closes after N bytes of the body), or an
    HTTP status (an OCI error)."""

    acts: list[str]
    ranges: list[str | None] = field(default_factory=list)  # the Range of each GET
    credentials: set[str | None] = field(default_factory=set)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        act = self.acts.pop(0) if len(self.acts) > 1 else self.acts[0]
        asked = request.headers.get("Range")
        self.ranges.append(asked)
        self.credentials.add(request.headers.get("Authorization"))
        if act.isdigit():
            code = {"401": "UNAUTHORIZED", "404": "BLOB_UNKNOWN"}.get(act, "UNAVAILABLE")
            body = error_body(code, f"said {act}")
            return web.Response(status=int(act), body=body, content_type="application/json")
        whole = asked is None or act == "ignore"
        start, end = (0, len(BLOB)) if whole else asked_range(asked)
        status = 200 if whole else 206
        response = web.StreamResponse(status=status, headers={"Docker-Content-Digest": DIGEST})
        response.content_length = end - start
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(BLOB)}"
        await response.prepare(request)
        cut = int(act.removeprefix("drop@")) if act.startswith("drop@") else end - start
        await response.write(BLOB[start : start + cut])
        if cut < end - start:
            assert request.transport is not None
            request.transport.close()  # after the bytes written: the node sees exactly `cut` of them
            return response
        await response.write_eof()
        return response


def asked_range(header: str) -> tuple[int, int]:
    first, _, last = header.removeprefix("bytes=").partition("-")
    return int(first), int(last) + 1 if last else len(BLOB)


@contextlib.asynccontextmanager
async def fake_registry(
    acts: list[str], metrics: NodeMetrics
) -> AsyncIterator[tuple[FakeRegistry, NodeRegistry, Upstream]]:
    fake = FakeRegistry(acts)
    app = web.Application()
    app.router.add_get(PATH, fake.blob)
    async with TestServer(app) as server:
        registry = NodeRegistry(host=f"registry.shoal.test:{server.port}", url=str(server.make_url("")))
        async with open_upstream([registry], metrics) as upstream:
            yield fake, registry, upstream


@dataclass
class Pulled:
    status: int
    body: bytes
    cut: bool  # the body ended before its Content-Length
    registry: FakeRegistry
    metrics: NodeMetrics

    def count(self, name: str, label: str = "value") -> float:
        return self.metrics.snapshot()[name][label]


async def pull(acts: list[str], headers: dict[str, str] | None = None) -> Pulled:
    """One blob GET with `TOKEN` through the node's registry handler on the direct path."""
    metrics = NodeMetrics()
    async with fake_registry(acts, metrics) as (fake, registry, upstream):
        handler = RegistryHandler(registry, upstream, UpstreamBlobSource(upstream, metrics), metrics)
        async with TestServer(registry_app(handler)) as node, aiohttp.ClientSession() as session:
            sent = {"Authorization": TOKEN, **(headers or {})}
            async with session.get(node.make_url(PATH), headers=sent) as response:
                body, cut = bytearray(), False
                try:
                    async for data in response.content.iter_any():
                        body += data
                except aiohttp.ClientPayloadError:
                    cut = True
                return Pulled(response.status, bytes(body), cut, fake, metrics)


@pytest.mark.parametrize(
    ("acts", "retries"),
    [
        (["serve"], 0),
        ([f"drop@{CUT}", "serve"], 1),
        ([f"drop@{CUT}", "500", "serve"], 2),
        ([f"drop@{CUT}", "503", "ignore"], 2),
        ([f"drop@{CUT}", "drop@0", "drop@100", "drop@0", "drop@0", "serve"], 5),  # bytes reset the count
    ],
    ids=["healthy", "dropped-once", "500-then-206", "registry-ignores-range", "progress-resets"],
)
async def test_a_registry_failing_mid_blob_is_resumed(
    acts: list[str], retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    pulled = await pull(acts)
    assert pulled.status == 200 and not pulled.cut
    assert f"sha256:{hashlib.sha256(pulled.body).hexdigest()}" == DIGEST
    assert pulled.count("shoal_registry_retries_total") == retries
    assert pulled.count("shoal_blob_bytes_total", "upstream") == len(BLOB)
    assert pulled.registry.credentials == {TOKEN}  # every resumed request with the client's credential
    if retries:
        assert pulled.registry.ranges[:2] == [None, f"bytes={CUT}-{len(BLOB) - 1}"]
    warned = [r for r in caplog.records if r.getMessage().startswith("registry failed mid-blob")]
    assert len(warned) == retries
    assert not any("client-token" in str(vars(record)) for record in caplog.records)


async def test_a_clients_own_range_is_resumed_within_it() -> None:
    pulled = await pull(["drop@1000", "serve"], {"Range": "bytes=5000-499999"})
    assert pulled.status == 206 and not pulled.cut
    assert pulled.body == BLOB[5000:500000]
    assert pulled.registry.ranges == ["bytes=5000-499999", "bytes=6000-499999"]


@pytest.mark.parametrize(
    ("acts", "requests"),
    [
        ([f"drop@{CUT}", "500"], 1 + RETRIES),
        ([f"drop@{CUT}", "drop@0"], 1 + RETRIES),
        ([f"drop@{CUT}", "401"], 2),  # a refusal is final: the credential expired, say
    ],
    ids=["500", "dropped", "refused"],
)
async def test_a_registry_failing_for_good_cuts_the_response_short(acts: list[str], requests: int) -> None:
    """The headers are out already: the client must see a short body, never a second response."""
    pulled = await pull(acts)
    assert pulled.status == 200 and pulled.cut
    assert pulled.body == BLOB[:CUT]
    assert len(pulled.registry.ranges) == requests
    assert pulled.count("shoal_registry_retries_total") == requests - 1
    assert pulled.count("shoal_proxy_upstream_errors_total") == 1


async def test_a_refusal_before_the_first_byte_is_the_registrys_own_answer() -> None:
    for status, code in ((401, "UNAUTHORIZED"), (404, "BLOB_UNKNOWN")):
        pulled = await pull([str(status)])
        assert pulled.status == status
        assert pulled.body == error_body(code, f"said {status}")
        assert pulled.count("shoal_registry_retries_total") == 0
        assert len(pulled.registry.ranges) == 1


@pytest.mark.parametrize(
    ("acts", "start", "end"),
    [
        (["serve"], 0, len(BLOB)),
        (["ignore"], 4096, 70000),  # a registry that ignores Range: skipped up to start, cut at end
        (["drop@100", "ignore"], 4096, 70000),
        (["drop@100", "500", "serve"], 2**19, len(BLOB)),
    ],
    ids=["whole", "ignored-range", "dropped-then-ignored", "dropped-then-500"],
)
async def test_read_range_yields_exactly_the_range(acts: list[str], start: int, end: int) -> None:
    async with fake_registry(acts, NodeMetrics()) as (fake, registry, upstream):
        headers = [("Authorization", TOKEN), ("Range", "bytes=0-1")]  # the client's Range is not sent
        data = b"".join([d async for d in upstream.read_range(registry, PATH, headers, start, end)])
    assert data == BLOB[start:end]
    assert fake.ranges[0] == f"bytes={start}-{end - 1}"
    assert fake.credentials == {TOKEN}


async def test_read_range_names_the_offset_when_it_gives_up() -> None:
    async with fake_registry(["drop@100", "500"], NodeMetrics()) as (fake, registry, upstream):
        received = bytearray()
        with pytest.raises(UpstreamBroken, match=f"offset {1000 + 100}"):
            async for data in upstream.read_range(registry, PATH, [], 1000, 5000):
                received += data
    assert received == BLOB[1000:1100]
    assert fake.ranges == ["bytes=1000-4999"] + ["bytes=1100-4999"] * RETRIES
