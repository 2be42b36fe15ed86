"""Layers through the swarm: real registry, real tracker, several real `shoal-node` processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lab.images import PushedImage, push_image
from lab.pki import new_lab_ca
from lab.procstat import cpu_seconds
from lab.registry import Registry
from lab.services import free_port, log_events

from common.certs import key_pem, make_csr, new_key
from common.ids import Digest, NodeId, Repository
from peer.cache import Credentials
from peer.config import PeerConfig
from peer.engine import Peer
from proxy.metrics import DISK_OPERATIONS
from tests.proxy.harness import RunningNode, node_config, registry_entry, run_node
from tests.tracker.harness import RunningTracker, run_tracker, tracker_config

REPO = "team/app"
LAYER = hashlib.sha256(b"seed").digest() * (3 * 2**20 // 32)  # 3 MiB: over p2p_min_bytes
CHUNK_SIZE = 2**20
CHUNKS = 3  # of LAYER
BIG = hashlib.sha256(b"big").digest() * (6 * 2**20 // 32)  # 6 MiB: more than `small_disk` holds


def tracker_entry(registry: Registry) -> dict[str, Any]:
    return registry_entry(registry) | {
        "token": {
            "issuer": registry.issuer_name,
            "service": registry.service,
            "certs": str(registry.certs_bundle),
        }
    }


@contextlib.asynccontextmanager
async def swarm_node(
    work: Path, registry: Registry, tracker_url: str, tracker_ca: Path, name: str, **overrides: Any
) -> AsyncIterator[RunningNode]:
    directory = work / name
    directory.mkdir(exist_ok=True)
    config = node_config(
        directory, [registry_entry(registry)], node_id=name, tracker=tracker_url,
        tracker_ca=str(tracker_ca), peer_listen=f"127.0.0.1:{free_port()}", p2p_min_bytes=2**20,
        stall_timeout=5, **overrides,
    )  # fmt: skip
    async with run_node(directory, config) as node:
        yield node


async def pull_blob(node: RunningNode, registry: Registry, digest: str, token: str) -> bytes:
    trust = ssl.create_default_context(cafile=str(node.ca_file(registry.host)))
    url = f"https://{registry.host}/v2/{REPO}/blobs/{digest}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url, headers={"Authorization": f"Bearer {token}"}, proxy=node.proxy_url, ssl=trust
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == digest
        return await resp.read()


@contextlib.asynccontextmanager
async def swarm_tracker(registry: Registry, work: Path, **overrides: Any) -> AsyncIterator[RunningTracker]:
    """A tracker for `registry` with its own TLS CA, cutting blobs into CHUNK_SIZE chunks."""
    tls_ca = new_lab_ca()
    config = tracker_config(work, tls_ca, [tracker_entry(registry)], chunk_size=CHUNK_SIZE, **overrides)
    async with run_tracker(work, tls_ca, config) as tracker:
        yield tracker


@contextlib.asynccontextmanager
async def lab(registry: Registry, work: Path) -> AsyncIterator[tuple[RunningTracker, PushedImage, str]]:
    image = await push_image(registry, REPO, [LAYER])
    async with swarm_tracker(registry, work, origin_lease=5) as tracker:
        yield tracker, image, registry.issuer.token({REPO: ["pull"]})


async def test_second_node_gets_the_layer_from_the_first(registry: Registry, tmp_path: Path) -> None:
    async with lab(registry, tmp_path) as (tracker, image, token):
        digest = image.layer_digests[0]
        async with (
            swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "node-a") as first,
            swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "node-b") as second,
        ):
            assert await pull_blob(first, registry, digest, token) == LAYER
            assert await first.metric("shoal_blob_bytes_total", source="upstream") == len(LAYER)
            await wait_seeding(first, CHUNKS)
            assert await pull_blob(second, registry, digest, token) == LAYER
            assert await second.metric("shoal_blob_bytes_total", source="p2p") == len(LAYER)
            assert await second.metric("shoal_blob_bytes_total", source="upstream") == 0
            await wait_cached(tmp_path / "node-b" / "cache" / "chunks" / digest.removeprefix("sha256:"))
            assert await pull_blob(second, registry, digest, token) == LAYER  # now from its cache
            assert await second.metric("shoal_blob_bytes_total", source="cache") == len(LAYER)
            await wait_seeding(second, CHUNKS)  # one torrent per chunk, all named for the blob
            assert set(await seeding(second)) == {"sha256-" + digest.removeprefix("sha256:")}
        assert await registry.blob_bytes_sent(digest) == len(LAYER)


async def wait_seeding(node: RunningNode, count: int = 1, timeout: float = 10) -> None:
    """Until the node's /status lists `count` complete torrents it seeds (an origin seeds once the
    tracker has accepted its torrent)."""
    for _ in range(int(timeout / 0.05)):
        if len(await seeding(node)) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the node seeds {await seeding(node)}, not {count} torrents:\n{node.log()}")


async def seeding(node: RunningNode) -> list[str]:
    return [b["name"] for b in await status_blobs(node) if b["state"] == "seeding" and b["progress"] == 1.0]


async def status_blobs(node: RunningNode) -> list[dict[str, Any]]:
    """What /status lists: the layers being fetched, then every chunk torrent."""
    async with aiohttp.ClientSession() as session, session.get(f"{node.admin_url}/status") as resp:
        blobs: list[dict[str, Any]] = (await resp.json())["blobs"]
    return blobs


async def healthz(node: RunningNode) -> int:
    timeout = aiohttp.ClientTimeout(total=2)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{node.admin_url}/healthz") as resp,
    ):
        return resp.status


async def test_concurrent_pulls_on_one_node_fetch_once(registry: Registry, tmp_path: Path) -> None:
    async with lab(registry, tmp_path) as (tracker, image, token):
        digest = image.layer_digests[0]
        async with swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "node-a") as node:
            bodies = await asyncio.gather(*(pull_blob(node, registry, digest, token) for _ in range(10)))
            assert all(body == LAYER for body in bodies)
        assert await registry.blob_bytes_sent(digest) == len(LAYER)


async def test_tracker_down_pull_still_succeeds(registry: Registry, tmp_path: Path) -> None:
    image = await push_image(registry, REPO, [LAYER])
    token = registry.issuer.token({REPO: ["pull"]})
    nowhere = f"https://127.0.0.1:{free_port()}"
    async with swarm_node(tmp_path, registry, nowhere, registry.ca_pem, "node-a") as node:
        assert await pull_blob(node, registry, image.layer_digests[0], token) == LAYER
        assert await node.metric("shoal_blob_bytes_total", source="upstream") == len(LAYER)


async def test_refused_join_leaves_the_answer_to_the_registry(registry: Registry, tmp_path: Path) -> None:
    async with lab(registry, tmp_path) as (tracker, image, _):
        other = registry.issuer.token({"team/other": ["pull"]})
        async with swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "node-a") as node:
            trust = ssl.create_default_context(cafile=str(node.ca_file(registry.host)))
            url = f"https://{registry.host}/v2/{REPO}/blobs/{image.layer_digests[0]}"
            headers = {"Authorization": f"Bearer {other}"}
            async with (
                aiohttp.ClientSession() as session,
                session.get(url, headers=headers, proxy=node.proxy_url, ssl=trust) as resp,
            ):
                assert resp.status == 401
                assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5-99"])
async def test_range_requests(registry: Registry, tmp_path: Path, header: str) -> None:
    async with lab(registry, tmp_path) as (tracker, image, token):
        digest = image.layer_digests[0]
        async with swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "node-a") as node:
            trust = ssl.create_default_context(cafile=str(node.ca_file(registry.host)))
            url = f"https://{registry.host}/v2/{REPO}/blobs/{digest}"
            headers = {"Authorization": f"Bearer {token}", "Range": header}
            async with (
                aiohttp.ClientSession() as session,
                session.get(url, headers=headers, proxy=node.proxy_url, ssl=trust) as resp,
            ):
                body = await resp.read()
            first, _, last = header.removeprefix("bytes=").partition("-")
            expected = LAYER[int(first) : int(last) + 1 if last else None]
            assert resp.status == 206 and body == expected


async def test_seeder_killed_mid_transfer_pull_still_succeeds(registry: Registry, tmp_path: Path) -> None:
    big = (hashlib.sha256(b"big").digest() * (8 * 2**20 // 32))[:-12345]  # not a whole number of pieces
    image = await push_image(registry, REPO, [big])
    digest = image.layer_digests[0]
    token = registry.issuer.token({REPO: ["pull"]})
    async with (
        swarm_tracker(registry, tmp_path) as tracker,
        swarm_node(
            tmp_path, registry, tracker.url, tracker.ca_file, "seeder", peer_upload_limit=2**20
        ) as seeder,
        swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "leecher") as leecher,
    ):
        assert await pull_blob(seeder, registry, digest, token) == big
        await wait_seeding(seeder, 8)
        pull = asyncio.ensure_future(pull_blob(leecher, registry, digest, token))
        while await leecher.metric("shoal_blob_bytes_total", source="p2p") == 0:
            await asyncio.sleep(0.2)
        seeder.process.kill()
        assert await pull == big
        from_peers = await leecher.metric("shoal_blob_bytes_total", source="p2p")
        from_registry = await leecher.metric("shoal_blob_bytes_total", source="upstream")
        assert 0 < from_peers < len(big) and from_peers + from_registry == len(big)


@contextlib.asynccontextmanager
async def liar(
    tracker: RunningTracker, registry: Registry, digest: str, token: str, tmp_path: Path
) -> AsyncIterator[int]:
    """A cluster member with a valid credential that takes the first chunk's lease, publishes a
    torrent of other bytes of the right length for it, and seeds that from a peer of its own;
    it never fetches anything from the registry. Yields the index of the chunk it lied about."""
    blob = Digest.parse(digest)
    key = new_key()
    async with tracker.client() as (client, _):
        swarm = await client.join(
            blob,
            registry.host,
            Repository.parse(REPO),
            NodeId.parse("liar"),
            make_csr(key),
            f"Bearer {token}",
        )
        lease = min(swarm.leases, key=lambda lease: lease.index)
        config = PeerConfig(cache_dir=tmp_path / "liar", peer_listen="127.0.0.1:0")
        async with Peer(config) as peer:
            credentials = Credentials(swarm.cert.encode(), key_pem(key), swarm.announce)
            chunked = await peer.open(blob, swarm.size, swarm.chunk_size, credentials)
            chunk = chunked.chunks[lease.index]
            chunked.chunk_file(lease.index).write_bytes(b"\xff" * chunk.length)
            metainfo = await chunked.make_metainfo(lease.index, swarm.ca.encode())
            await client.publish_chunk(blob, lease.index, lease.token, metainfo)
            await chunked.seed(lease.index, metainfo)
            await client.announce(swarm.announce, blob.swarm_id, peer.port, left=swarm.size - chunk.length)
            yield lease.index


async def test_a_chunk_of_wrong_bytes_is_withdrawn_and_a_retry_gets_the_right_ones(
    registry: Registry, tmp_path: Path
) -> None:
    image = await push_image(registry, REPO, [LAYER])
    digest = image.layer_digests[0]
    token = registry.issuer.token({REPO: ["pull"]})
    async with (
        swarm_tracker(registry, tmp_path, origin_lease=3) as tracker,
        liar(tracker, registry, digest, token, tmp_path) as lied_about,
        swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "honest") as honest,
    ):
        # The bytes of the liar's chunk pass every piece check (its torrent describes them), so
        # only the whole digest shows them wrong: the first response is cut before its end.
        with pytest.raises(aiohttp.ClientPayloadError):
            await pull_blob(honest, registry, digest, token)
        assert await pull_blob(honest, registry, digest, token) == LAYER
        withdrawn = events(tracker, "withdrawn")
        assert [(e["node"], e["chunk"]) for e in withdrawn] == [("liar", lied_about)], tracker.log()[-4000:]


async def test_a_report_against_good_chunks_changes_nothing(registry: Registry, tmp_path: Path) -> None:
    async with lab(registry, tmp_path) as (tracker, image, token):
        digest = image.layer_digests[0]
        async with swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "node-a") as node:
            assert await pull_blob(node, registry, digest, token) == LAYER
            await wait_seeding(node, CHUNKS)
            blob = Digest.parse(digest)
            async with tracker.client() as (client, _):
                swarm = await client.join(
                    blob, registry.host, Repository.parse(REPO), NodeId.parse("accuser"),
                    make_csr(new_key()), f"Bearer {token}",
                )  # fmt: skip
                withdrawn = await client.report(
                    blob,
                    "digest_mismatch",
                    swarm.key,
                    registry.host,
                    Repository.parse(REPO),
                    f"Bearer {token}",
                )
                assert withdrawn == []
                still = await client.sync(blob, swarm.key, [], 0)
            assert sorted(chunk.index for chunk in still.chunks) == list(range(CHUNKS))
            assert events(tracker, "withdrawn") == []


def events(tracker: RunningTracker, event: str) -> list[dict[str, Any]]:
    return log_events(tracker.log(), event)


@pytest.mark.parametrize("role", ["origin", "leecher"])
async def test_a_full_cache_disk_leaves_the_layer_to_the_registry(
    registry: Registry, tmp_path: Path, small_disk: Path, role: str
) -> None:
    """The layer is larger than the node's cache disk, whether the node fetches its chunks from the
    registry itself (origin) or through libtorrent from a peer (leecher)."""
    image = await push_image(registry, REPO, [BIG])
    digest = image.layer_digests[0]
    token = registry.issuer.token({REPO: ["pull"]})
    async with (
        swarm_tracker(registry, tmp_path) as tracker,
        swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "seeder") as seeder,
    ):
        if role == "leecher":
            assert await pull_blob(seeder, registry, digest, token) == BIG
            await wait_seeding(seeder, len(BIG) // CHUNK_SIZE)
        async with swarm_node(
            tmp_path, registry, tracker.url, tracker.ca_file, "small", cache_dir=str(small_disk)
        ) as node:
            pull = asyncio.ensure_future(pull_blob(node, registry, digest, token))
            while not pull.done():
                assert await healthz(node) == 200
                await asyncio.sleep(0.1)
            assert await pull == BIG
            errors = [await node.metric("shoal_disk_errors_total", operation=op) for op in DISK_OPERATIONS]
            assert sum(errors) >= 1, node.log()  # what fills the disk first varies: chunk or metainfo
            assert "disk error; the layer is not kept on this node" in node.log()
            await wait_given_up(node, small_disk)
            cpu = cpu_seconds(node.process.pid)
            await asyncio.sleep(2)
            assert cpu_seconds(node.process.pid) - cpu < 0.2  # idle: nothing retries or spins
            assert await healthz(node) == 200
            assert await pull_blob(node, registry, digest, token) == BIG  # and again


async def wait_given_up(node: RunningNode, cache_dir: Path, timeout: float = 10) -> None:
    """Until the node fetches and seeds nothing and its cache holds no file (a pull may end before
    the layer's files are deleted)."""
    for _ in range(int(timeout / 0.05)):
        files = [path for path in cache_dir.rglob("*") if path.is_file()]
        if not files and not await status_blobs(node):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"left behind: {files}, {await status_blobs(node)}:\n{node.log()}")


@contextlib.asynccontextmanager
async def cached_layer(
    registry: Registry, tmp_path: Path
) -> AsyncIterator[tuple[RunningNode, str, str, Path]]:
    """A node that pulled LAYER once and seeds it: the node, the layer's digest, a token, and the
    layer's folder of chunk files (the layout of peer/cache.py)."""
    async with lab(registry, tmp_path) as (tracker, image, token):
        digest = image.layer_digests[0]
        async with swarm_node(tmp_path, registry, tracker.url, tracker.ca_file, "node-a") as node:
            assert await pull_blob(node, registry, digest, token) == LAYER
            await wait_seeding(node, CHUNKS)
            chunks = tmp_path / "node-a" / "cache" / "chunks" / digest.removeprefix("sha256:")
            await wait_cached(chunks)
            yield node, digest, token, chunks


def marker(chunks: Path) -> Path:
    """The cache's marker of the layer whose chunk files are in `chunks`."""
    return chunks.parent.parent / "blobs" / "sha256" / chunks.name


async def wait_cached(chunks: Path, timeout: float = 10) -> None:
    """Until the layer is in the cache: its digest is checked, and its marker written, only once
    its last chunk is complete, so a pull may end first."""
    for _ in range(int(timeout / 0.05)):
        if marker(chunks).exists():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{chunks.name} not cached after {timeout} s")


async def test_a_cached_layer_changed_on_disk_is_cut_short_dropped_and_fetched_again(
    registry: Registry, tmp_path: Path
) -> None:
    async with cached_layer(registry, tmp_path) as (node, digest, token, chunks):
        with (chunks / "1").open("r+b") as chunk:
            chunk.seek(1000)
            flipped = bytes([chunk.read(1)[0] ^ 0xFF])
            chunk.seek(1000)
            chunk.write(flipped)
        with pytest.raises(aiohttp.ClientPayloadError):  # cut short: never a whole wrong body
            await pull_blob(node, registry, digest, token)
        assert await seeding(node) == []
        assert not marker(chunks).exists()
        assert await pull_blob(node, registry, digest, token) == LAYER


async def test_a_cached_chunk_file_cut_short_leaves_the_rest_to_the_registry(
    registry: Registry, tmp_path: Path
) -> None:
    async with cached_layer(registry, tmp_path) as (node, digest, token, chunks):
        os.truncate(chunks / "1", CHUNK_SIZE // 2)
        assert await pull_blob(node, registry, digest, token) == LAYER
        assert await node.metric("shoal_blob_bytes_total", source="cache") == CHUNK_SIZE * 3 // 2
        assert await node.metric("shoal_disk_errors_total", operation="chunk_read") == 1
        assert await seeding(node) == []
        assert not marker(chunks).exists()
