"""Real dockerd daemons for tests, each with its own /etc/docker, data root and socket.

dockerd runs in its own mount namespace with a private directory bind-mounted on /etc/docker, so
its certs.d is the one the node writes to; it reaches the registry only through HTTPS_PROXY and
never resolves the registry's name itself, so it really verifies the node's certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest


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


async def login_and_pull(host: str, work: Path, registry_host: str, reference: str) -> str:
    """`docker login` as the realm's reader, then `docker pull`; the pull's output."""
    code, out = await docker(
        host, work, "login", "--username", "reader", "--password-stdin", registry_host, stdin=b"reader-secret"
    )
    assert code == 0, out + tail(work / "dockerd.log")
    code, out = await docker(host, work, "pull", reference)
    assert code == 0, out + tail(work / "dockerd.log")
    return out
