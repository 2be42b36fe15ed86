"""The strongest test: a real dockerd pulls through the node from the real registry.

dockerd runs in its own mount namespace with a private directory bind-mounted on /etc/docker, so
its certs.d is the one the node writes to; it reaches the registry only through HTTPS_PROXY and
never resolves the registry's name itself, so it really verifies the node's certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.proxy.harness import node_config, registry_entry, run_node
from tests.support.images import push_image, random_tar_layer
from tests.support.registry import Registry

REPO = "team/app"


def require_tools() -> None:
    missing = [tool for tool in ("dockerd", "docker", "containerd", "unshare") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install docker.io util-linux")
    if os.geteuid() != 0:
        pytest.fail("dockerd needs root (mount namespaces, its own data root): run the tests as root")


@contextlib.asynccontextmanager
async def dockerd(work: Path, etc_docker: Path, proxy_url: str) -> AsyncIterator[str]:
    """dockerd with its own /etc/docker, data root and socket; yields the `-H` address."""
    work.mkdir(parents=True, exist_ok=True)
    # Unix socket paths have a 108-byte limit; pytest's tmp_path plus containerd's names exceed it.
    short = Path(tempfile.mkdtemp(prefix="shoal-dockerd-", dir="/tmp"))
    sock = short / "docker.sock"
    log = (work / "dockerd.log").open("ab")
    command = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        'mount --bind "$0" /etc/docker && exec "$@"', str(etc_docker),
        "dockerd", "--host", f"unix://{sock}", "--data-root", str(work / "data"),
        "--exec-root", str(short / "exec"), "--pidfile", str(work / "dockerd.pid"),
        "--storage-driver=vfs", "--iptables=false", "--ip-masq=false", "--bridge=none",
    ]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url, "NO_PROXY": ""}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    host = f"unix://{sock}"
    try:
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {process.returncode}:\n{tail(work / 'dockerd.log')}")
            if (await docker(host, work, "version"))[0] == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"dockerd not ready:\n{tail(work / 'dockerd.log')}")
        yield host
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(short, ignore_errors=True)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def docker(host: str, work: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "docker", "-H", host, *args,
        env={"PATH": os.environ["PATH"], "DOCKER_CONFIG": str(work / "client")},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def test_dockerd_pulls_through_node(registry: Registry, tmp_path: Path) -> None:
    require_tools()
    layers = [
        random_tar_layer(900_000, seed=21),
        random_tar_layer(700_000, seed=22),
        random_tar_layer(10, seed=23),
    ]
    image = await push_image(registry, REPO, layers)
    etc_docker = tmp_path / "etc-docker"
    certs = etc_docker / "certs.d"
    (certs / registry.host).mkdir(parents=True)
    # The operator's trust for this registry: the token realm (another host, tunnelled by the
    # node) is verified by dockerd with it.
    shutil.copy(registry.ca_pem, certs / registry.host / "ca.crt")
    config = node_config(tmp_path, [registry_entry(registry)], docker_certs_dir=str(certs))
    async with (
        run_node(tmp_path, config) as node,
        dockerd(tmp_path / "dockerd", etc_docker, node.proxy_url) as host,
    ):
        work = tmp_path / "dockerd"
        code, out = await docker(
            host,
            work,
            "login",
            "--username",
            "reader",
            "--password-stdin",
            registry.host,
            stdin=b"reader-secret",
        )
        assert code == 0, out + tail(work / "dockerd.log") + node.log()
        code, out = await docker(host, work, "pull", f"{registry.host}/{REPO}:latest")
        assert code == 0, out + tail(work / "dockerd.log") + node.log()
        assert image.manifest_digest in out
        code, out = await docker(
            host, work, "image", "inspect", "--format", "{{.Id}}", f"{registry.host}/{REPO}"
        )
        assert code == 0 and out.strip() == image.config_digest, out
        for digest in image.layer_digests:
            assert await registry.blob_get_count(digest) == 1
        total = sum(len(layer) for layer in layers) + json.loads(image.manifest)["config"]["size"]
        assert await node.metric("shoal_blob_bytes_total", source="upstream") == total
    assert sorted(p.name for p in (certs / registry.host).iterdir()) == ["ca.crt"]
