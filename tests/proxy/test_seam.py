"""The proxy in process on the default asyncio loop (the binary runs uvloop), with a BlobSource
of its own: blob requests reach the source, everything else the registry."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from lab.registry import Registry
from lab.services import free_port

from common.config import load_config
from proxy.blobs import BlobRequest
from proxy.ca import LeafContexts, ca_files, node_ca
from proxy.config import NodeConfig
from proxy.metrics import NodeMetrics
from proxy.server import ProxyServer
from proxy.upstream import open_upstream

REPO = "team/app"
HEX = "d" * 64


class FixedBlobs:
    """A stand-in for the P2P path: answers every blob itself and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[BlobRequest] = []

    async def serve(self, blob: BlobRequest) -> web.StreamResponse:
        self.asked.append(blob)
        response = web.StreamResponse(headers={"Docker-Content-Digest": str(blob.digest)})
        response.content_length = 5
        await response.prepare(blob.request)
        await response.write(b"hello")
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def proxy_in_process(config: NodeConfig, blobs: FixedBlobs) -> AsyncIterator[ssl.SSLContext]:
    ca = node_ca(config.node_id)
    with ca_files(ca, config.docker_certs_dir, [r.host for r in config.registries]) as written:
        metrics = NodeMetrics()
        async with open_upstream(config.registries, metrics) as upstream:
            proxy = ProxyServer(config, LeafContexts(ca), upstream, blobs, metrics)
            async with proxy.serving():
                yield ssl.create_default_context(cafile=str(written[0]))


async def test_blob_source_seam_on_plain_asyncio(registry: Registry, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    data = {
        "listen": listen,
        "node_id": "in-process",
        "docker_certs_dir": str(tmp_path / "certs.d"),
        "registries": [{"host": registry.host, "url": registry.url, "ca": str(registry.ca_pem)}],
    }
    config = load_config(NodeConfig, data)
    blobs = FixedBlobs()
    token = registry.issuer.token({REPO: ["pull"]})
    headers = {"Authorization": f"Bearer {token}", "Range": "bytes=0-"}
    async with proxy_in_process(config, blobs) as trust, aiohttp.ClientSession() as session:
        base = f"https://{registry.host}/v2/{REPO}"
        proxy = f"http://{listen}"
        async with session.get(f"{base}/blobs/sha256:{HEX}", headers=headers, proxy=proxy, ssl=trust) as resp:
            assert resp.status == 200
            assert await resp.read() == b"hello"
        (asked,) = blobs.asked
        assert (str(asked.repository), str(asked.digest)) == (REPO, f"sha256:{HEX}")
        assert asked.registry.host == registry.host
        assert asked.request.headers["Authorization"] == f"Bearer {token}"
        assert asked.request.headers["Range"] == "bytes=0-"
        assert asked.path_qs == f"/v2/{REPO}/blobs/sha256:{HEX}"
        # Not a blob: straight to the real registry, which knows no such manifest.
        async with session.get(f"{base}/manifests/latest", headers=headers, proxy=proxy, ssl=trust) as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert len(blobs.asked) == 1
