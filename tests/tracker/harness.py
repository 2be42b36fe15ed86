"""Real `shoal-tracker` processes for tests: config on disk, started with the lab's launcher, stopped;
and a real redis-server for the shared store."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from lab.pki import LOOPBACK, issue_server_files, write_ca
from lab.services import Service, free_port, https_context, start_tracker

from common.certs import CertificateAuthority
from tracker.client import TrackerClient


@dataclass
class RunningTracker:
    service: Service
    url: str
    config_path: Path
    state_dir: Path
    ca_file: Path  # verifies the tracker's TLS

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.service.process

    def ssl_context(self) -> ssl.SSLContext:
        return https_context(self.ca_file)

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[tuple[TrackerClient, aiohttp.ClientSession]]:
        async with aiohttp.ClientSession() as session:
            yield TrackerClient(session, self.url, self.ssl_context()), session

    def log(self) -> str:
        return self.service.log()


def tracker_config(
    work: Path, tls_ca: CertificateAuthority, registries: list[dict[str, Any]], **overrides: Any
) -> dict[str, Any]:
    port = free_port()
    tls = issue_server_files(tls_ca, work, f"tracker-tls-{port}", LOOPBACK, "localhost")
    config = {
        "listen": f"{LOOPBACK}:{port}",
        "public_url": f"https://{LOOPBACK}:{port}",
        "tls": {"cert": str(tls.cert), "key": str(tls.key)},
        "state_dir": str(work / "tracker-state"),
        "registries": registries,
        "log_level": "debug",
    }
    return config | overrides


@contextlib.asynccontextmanager
async def run_tracker(
    work: Path, tls_ca: CertificateAuthority, config: dict[str, Any]
) -> AsyncIterator[RunningTracker]:
    ca_file = write_ca(tls_ca, work / "tracker-ca.pem")
    config_path = work / f"tracker-{config['listen'].rsplit(':', 1)[1]}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    url = config["public_url"]
    async with await start_tracker(config_path, url, ca_file, timeout=20) as service:
        yield RunningTracker(service, url, config_path, Path(config["state_dir"]), ca_file)


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is missing: apt-get install redis-server")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None:
                raise RuntimeError("redis-server exited at start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
