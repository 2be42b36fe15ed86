"""Real `python -m proxy` processes for tests: config on disk, started, health-checked, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from lab.cluster import admin_metric
from lab.registry import Registry, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CA_FILE = "shoal-node-ca.crt"


@dataclass
class RunningNode:
    proxy_url: str  # what HTTPS_PROXY names
    admin_url: str
    certs_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ca_file(self, host: str) -> Path:
        return self.certs_dir / host / CA_FILE

    async def metric(self, name: str, **labels: str) -> float:
        value, text = await admin_metric(self.admin_url, name, **labels)
        if value is None:
            raise AssertionError(f"no {name}{labels} in /metrics:\n{text}")
        return value

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return await asyncio.to_thread(self.process.wait, timeout)


def registry_entry(registry: Registry) -> dict[str, Any]:
    """The node reaches the test registry on 127.0.0.1 and verifies its name `registry.shoal.test`."""
    return {"host": registry.host, "url": registry.url, "ca": str(registry.ca_pem)}


def node_config(work: Path, registries: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "node_id": "test-node",
        "cache_dir": str(work / "cache"),
        "docker_certs_dir": str(work / "certs.d"),
        "shutdown_grace": 5,
        "log_level": "debug",
        "registries": registries,
    }
    return config | overrides


def start_node(work: Path, config: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
    config_path = work / f"node-{config['listen'].rsplit(':', 1)[1]}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    log_path = config_path.with_suffix(".log")
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config_path)],
            cwd=REPO_ROOT, stdout=log, stderr=log, env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    return process, log_path


@contextlib.asynccontextmanager
async def run_node(work: Path, config: dict[str, Any]) -> AsyncIterator[RunningNode]:
    process, log_path = start_node(work, config)
    node = RunningNode(
        f"http://{config['listen']}",
        f"http://{config['admin']}",
        Path(config["docker_certs_dir"]),
        process,
        log_path,
    )
    try:
        await wait_healthy(node)
        yield node
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_healthy(node: RunningNode, timeout: float = 20) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(int(timeout * 20)):
            if node.process.poll() is not None:
                raise RuntimeError(f"node exited with {node.process.returncode}:\n{node.log()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{node.admin_url}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"node not healthy after {timeout} s:\n{node.log()}")
