"""The strongest tests: real dockerd daemons pull through their nodes from the real registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lab.images import push_image, random_tar_layer
from lab.pki import new_lab_ca
from lab.registry import Registry
from lab.services import Dockerd, start_dockerd

from tests.proxy.harness import RunningNode, node_config, registry_entry, run_node
from tests.proxy.test_p2p import swarm_node, tracker_entry
from tests.tracker.harness import run_tracker, tracker_config

pytestmark = pytest.mark.e2e

REPO = "team/app"
DOCKERD_TOOLS = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "containerd": "containerd",
    "unshare": "util-linux",
}


@contextlib.asynccontextmanager
async def dockerd(work: Path, etc_docker: Path, proxy_url: str) -> AsyncIterator[Dockerd]:
    """A dockerd of its own that pulls through `proxy_url` and never resolves the registry itself."""
    # Unix socket paths have a 108-byte limit; pytest's tmp_path plus containerd's names exceed it.
    with tempfile.TemporaryDirectory(prefix="shoal-dockerd-", dir="/tmp") as short:
        daemon = Dockerd(work, etc_docker, Path(short))
        proxy = {"HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url, "NO_PROXY": ""}
        async with await start_dockerd(daemon, proxy):
            yield daemon


async def login_and_pull(daemon: Dockerd, reference: str) -> str:
    """`docker login` as the realm's reader, then `docker pull`; the pull's output."""
    registry = reference.partition("/")[0]
    code, out = await daemon.docker(
        "login", "--username", "reader", "--password-stdin", registry, stdin=b"reader-secret"
    )
    assert code == 0, out + daemon_log(daemon)
    code, out = await daemon.docker("pull", reference)
    assert code == 0, out + daemon_log(daemon)
    return out


def daemon_log(daemon: Dockerd) -> str:
    return daemon.log_path.read_text(errors="replace")[-4000:]


def etc_docker_for(work: Path, registry: Registry) -> Path:
    """A private /etc/docker whose certs.d holds the operator's trust for the registry: the token
    realm (another host, tunnelled by the node) is verified by dockerd with it."""
    etc_docker = work / "etc-docker"
    (etc_docker / "certs.d" / registry.host).mkdir(parents=True)
    shutil.copy(registry.ca_pem, etc_docker / "certs.d" / registry.host / "ca.crt")
    return etc_docker


async def image_id(daemon: Dockerd, reference: str) -> str:
    code, out = await daemon.docker("image", "inspect", "--format", "{{.Id}}", reference)
    assert code == 0, out
    return out.strip()


async def test_dockerd_pulls_through_node(registry: Registry, tmp_path: Path) -> None:
    layers = [
        random_tar_layer(900_000, seed=21),
        random_tar_layer(700_000, seed=22),
        random_tar_layer(10, seed=23),
    ]
    image = await push_image(registry, REPO, layers)
    etc_docker = etc_docker_for(tmp_path, registry)
    certs = etc_docker / "certs.d"
    config = node_config(tmp_path, [registry_entry(registry)], docker_certs_dir=str(certs))
    async with (
        run_node(tmp_path, config) as node,
        dockerd(tmp_path / "dockerd", etc_docker, node.proxy_url) as daemon,
    ):
        reference = f"{registry.host}/{REPO}:latest"
        out = await login_and_pull(daemon, reference)
        assert image.manifest_digest in out, out + node.log()
        assert await image_id(daemon, reference) == image.config_digest
        for digest in image.layer_digests:
            assert await registry.blob_get_count(digest) == 1
        total = sum(len(layer) for layer in layers) + json.loads(image.manifest)["config"]["size"]
        assert await node.metric("shoal_blob_bytes_total", source="upstream") == total
    assert sorted(p.name for p in (certs / registry.host).iterdir()) == ["ca.crt"]


@contextlib.asynccontextmanager
async def node_with_dockerd(
    work: Path, registry: Registry, tracker_url: str, tracker_ca: Path, name: str
) -> AsyncIterator[tuple[RunningNode, Dockerd]]:
    etc_docker = etc_docker_for(work / name, registry)
    certs = str(etc_docker / "certs.d")
    async with (
        swarm_node(work, registry, tracker_url, tracker_ca, name, docker_certs_dir=certs) as node,
        dockerd(work / name / "dockerd", etc_docker, node.proxy_url) as daemon,
    ):
        yield node, daemon


async def test_two_dockerds_pull_at_once_and_the_registry_serves_each_layer_once(
    registry: Registry, tmp_path: Path
) -> None:
    layers = [random_tar_layer(3_000_000, seed=31), random_tar_layer(2_000_000, seed=32)]
    image = await push_image(registry, REPO, layers)
    tls_ca = new_lab_ca()
    tracker_cfg = tracker_config(tmp_path, tls_ca, [tracker_entry(registry)], origin_lease=10)
    reference = f"{registry.host}/{REPO}:latest"
    async with (
        run_tracker(tmp_path, tls_ca, tracker_cfg) as tracker,
        node_with_dockerd(tmp_path, registry, tracker.url, tracker.ca_file, "node-a") as (node_a, daemon_a),
        node_with_dockerd(tmp_path, registry, tracker.url, tracker.ca_file, "node-b") as (node_b, daemon_b),
    ):
        await asyncio.gather(login_and_pull(daemon_a, reference), login_and_pull(daemon_b, reference))
        for daemon in (daemon_a, daemon_b):
            assert await image_id(daemon, reference) == image.config_digest
        for digest, layer in zip(image.layer_digests, layers, strict=True):  # once, in ranges maybe
            assert await registry.blob_bytes_sent(digest) == len(layer), registry.log_tail()
        layer_bytes = sum(len(layer) for layer in layers)
        # Each layer came once from the registry (to its origin node) and once from a peer.
        from_peers = [await node.metric("shoal_blob_bytes_total", source="p2p") for node in (node_a, node_b)]
        assert sum(from_peers) == layer_bytes, (from_peers, node_a.log()[-3000:], node_b.log()[-3000:])
