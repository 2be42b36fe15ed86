"""Real `shoal-tracker` processes for tests: config written to disk, started, health-checked, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from tracker.client import TrackerClient

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningTracker:
    url: str
    config_path: Path
    state_dir: Path
    ca_file: Path  # verifies the tracker's TLS
    process: subprocess.Popen[bytes]
    log_path: Path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[tuple[TrackerClient, aiohttp.ClientSession]]:
        async with aiohttp.ClientSession() as session:
            yield TrackerClient(session, self.url, self.ssl_context()), session

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def tracker_config(
    work: Path, tls_ca: trustme.CA, registries: list[dict[str, Any]], **overrides: Any
) -> dict[str, Any]:
    port = free_port()
    tls = work / f"tracker-tls-{port}.pem"
    tls_ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(tls))
    config = {
        "listen": f"127.0.0.1:{port}",
        "public_url": f"https://127.0.0.1:{port}",
        "tls": {"cert": str(tls), "key": str(tls)},
        "state_dir": str(work / "tracker-state"),
        "registries": registries,
        "log_level": "debug",
    }
    return config | overrides


@contextlib.asynccontextmanager
async def run_tracker(
    work: Path, tls_ca: trustme.CA, config: dict[str, Any]
) -> AsyncIterator[RunningTracker]:
    ca_file = work / "tracker-ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    config_path = work / f"tracker-{config['listen'].rsplit(':', 1)[1]}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    log_path = config_path.with_suffix(".log")
    with open(log_path, "ab") as log, _process(config_path, log) as process:
        tracker = RunningTracker(
            config["public_url"], config_path, Path(config["state_dir"]), ca_file, process, log_path
        )
        await _wait_healthy(tracker)
        yield tracker


@contextlib.contextmanager
def _process(config_path: Path, log: Any) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tracker", "--config", str(config_path)],
        cwd=REPO_ROOT, stdout=log, stderr=log, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _wait_healthy(tracker: RunningTracker, timeout: float = 20) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(int(timeout * 10)):
            if tracker.process.poll() is not None:
                raise RuntimeError(f"tracker exited with {tracker.process.returncode}:\n{tracker.log()}")
            try:
                async with session.get(f"{tracker.url}/healthz", ssl=tracker.ssl_context()) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"tracker not healthy after {timeout} s:\n{tracker.log()}")


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
