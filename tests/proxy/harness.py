"""Real `shoal-node` processes for tests: config on disk, started with the lab's launcher, stopped."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.registry import Registry
from lab.services import Service, free_port, read_metric, start_node

CA_FILE = "shoal-node-ca.crt"


@dataclass
class RunningNode:
    service: Service
    proxy_url: str  # what HTTPS_PROXY names
    admin_url: str
    certs_dir: Path

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.service.process

    def log(self) -> str:
        return self.service.log()

    def ca_file(self, host: str) -> Path:
        return self.certs_dir / host / CA_FILE

    async def metric(self, name: str, **labels: str) -> float:
        value, text = await read_metric(self.admin_url, name, **labels)
        if value is None:
            raise AssertionError(f"no {name}{labels} in /metrics:\n{text}")
        return value

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        return await self.service.stop(signum, timeout)


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


def write_node_config(work: Path, config: dict[str, Any]) -> Path:
    path = work / f"node-{config['listen'].rsplit(':', 1)[1]}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@contextlib.asynccontextmanager
async def run_node(work: Path, config: dict[str, Any]) -> AsyncIterator[RunningNode]:
    admin_url = f"http://{config['admin']}"
    async with await start_node(write_node_config(work, config), admin_url, timeout=20) as service:
        yield RunningNode(service, f"http://{config['listen']}", admin_url, Path(config["docker_certs_dir"]))
