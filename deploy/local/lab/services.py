"""One way to start shoal's services and their real collaborators as processes, for the lab, the
tests and the benchmarks alike: the token realm, `shoal-tracker`, `shoal-node` and dockerd (the
registry is `lab.registry.Registry`, built on the same pieces).

Each `start_*` takes a config its caller wrote, starts the process through a `Spawn` (here, in the
root namespace, or inside a lab host with `Network.spawner`), waits until it answers its health
probe, and returns a `Service`. A service that exits or stays unhealthy fails the start with the
tail of its log. Readiness is always an answer on the wire, never a line of log text.
"""

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from lab.pki import LOOPBACK

LAB_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # deploy/local: lets children import `lab`
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
DOCKERD_TOOLS = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "containerd": "containerd",
    "unshare": "util-linux",
}


def require_tools(tools: Mapping[str, str]) -> None:
    """Fail, saying what to install, when a tool or root is missing (never skip: that hides it)."""
    missing = sorted({package for tool, package in tools.items() if shutil.which(tool) is None})
    if missing:
        raise RuntimeError(f"the lab needs {', '.join(tools)}: apt-get install -y {' '.join(missing)}")
    if os.geteuid() != 0:
        raise RuntimeError("the lab needs root (network and mount namespaces): run it as root")


class Spawn(Protocol):
    def __call__(
        self, argv: Sequence[str], *, log: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]: ...


def spawn_here(argv: Sequence[str], *, log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start `argv` in this namespace, stdout and stderr appended to `log`."""
    with log.open("ab") as output:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            env=dict(env), start_new_session=True,
        )  # fmt: skip


async def run_command(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdin: bytes | None = None, timeout: float
) -> tuple[int, str]:
    """Run to completion without blocking the event loop: (exit code, stdout and stderr); killed
    after `timeout`."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"({path}: {error})"


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, unbuffered, with the lab package importable (`python -m lab.…`)."""
    path = os.pathsep.join(filter(None, [str(LAB_PACKAGE_DIR), os.environ.get("PYTHONPATH")]))
    return os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path} | dict(extra or {})


@dataclass
class Service:
    """A started process and its log; `async with` stops it on exit."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `signum`, wait up to `timeout`, then SIGKILL; the exit code."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            return await self.kill()

    async def kill(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        return await asyncio.to_thread(self.process.wait)

    async def wait_healthy(self, probe: Callable[[], Awaitable[bool]], timeout: float) -> None:
        """Poll `probe()` until it returns True; fail with the log's tail if the process exits
        or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                if await probe():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} not healthy after {timeout:.0f} s; {self.log_path}:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def started(
    name: str,
    argv: Sequence[str],
    log: Path,
    probe: Callable[[], Awaitable[bool]],
    *,
    spawn: Spawn = spawn_here,
    env: Mapping[str, str] | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> Service:
    """Spawn `argv` and wait until `probe()` says it is healthy; on failure nothing is left running."""
    log.parent.mkdir(parents=True, exist_ok=True)
    service = Service(name, spawn(argv, log=log, env=python_env() if env is None else env), log)
    try:
        await service.wait_healthy(probe, timeout)
    except BaseException:
        await service.kill()
        raise
    return service


async def http_status(url: str, context: ssl.SSLContext | None = None) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
        session.get(url, ssl=context or False) as response,
    ):
        return response.status


def https_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


async def start_realm(
    config: Path, url: str, ca_file: Path, *, spawn: Spawn = spawn_here, timeout: float = STARTUP_TIMEOUT
) -> Service:
    """`python -m lab.token_server` (config from `lab.token_server.write_config`), reached at `url`."""
    argv = [sys.executable, "-m", "lab.token_server", "--config", str(config)]

    async def healthy() -> bool:  # an anonymous token request: 200 with a token granting nothing
        return await http_status(f"{url}/token", https_context(ca_file)) == 200

    return await started(
        "token realm", argv, config.with_suffix(".log"), healthy, spawn=spawn, timeout=timeout
    )


async def start_tracker(
    config: Path, url: str, ca_file: Path, *, spawn: Spawn = spawn_here, timeout: float = STARTUP_TIMEOUT
) -> Service:
    """`shoal-tracker --config config`, healthy when `url/healthz` answers over TLS verified with
    `ca_file`; its log beside the config."""
    argv = [sys.executable, "-m", "tracker", "--config", str(config)]

    async def healthy() -> bool:
        return await http_status(f"{url}/healthz", https_context(ca_file)) == 200

    return await started(
        "shoal-tracker", argv, config.with_suffix(".log"), healthy, spawn=spawn, timeout=timeout
    )


async def start_node(
    config: Path, admin_url: str, *, spawn: Spawn = spawn_here, name: str = "shoal-node",
    timeout: float = STARTUP_TIMEOUT,
) -> Service:  # fmt: skip
    """`shoal-node --config config`, healthy when its admin endpoint's `/healthz` answers."""
    argv = [sys.executable, "-m", "proxy", "--config", str(config)]

    async def healthy() -> bool:
        return await http_status(f"{admin_url}/healthz") == 200

    return await started(name, argv, config.with_suffix(".log"), healthy, spawn=spawn, timeout=timeout)


@dataclass(frozen=True)
class Dockerd:
    """Where a dockerd keeps its state; `host` is what `docker -H` takes."""

    workdir: Path  # data root, log, the docker CLI's config
    etc_docker: Path  # bind-mounted on /etc/docker: dockerd reads trust only from /etc/docker/certs.d
    run_dir: Path  # short: Unix socket paths are limited to 108 bytes

    @property
    def host(self) -> str:
        return f"unix://{self.run_dir / 'docker.sock'}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dockerd.log"

    async def docker(self, *args: str, stdin: bytes | None = None, timeout: float = 300) -> tuple[int, str]:
        """The docker CLI against this dockerd: (exit code, stdout and stderr)."""
        env = {"PATH": os.environ["PATH"], "DOCKER_CONFIG": str(self.workdir / "client")}
        return await run_command(["docker", "-H", self.host, *args], env=env, stdin=stdin, timeout=timeout)


async def start_dockerd(
    daemon: Dockerd,
    proxy_env: Mapping[str, str],
    *,
    netns: str | None = None,
    hosts: Path | None = None,
    spawn: Spawn = spawn_here,
    timeout: float = STARTUP_TIMEOUT,
) -> Service:
    """dockerd with its own /etc/docker, data root and socket, its proxy from `proxy_env`, in the
    network namespace `netns` (default: this one), with `hosts` as its /etc/hosts if given.

    It runs in a mount namespace of its own where `etc_docker` is bind-mounted on /etc/docker. Not
    under `ip netns exec`: that remounts /sys, which hides the cgroup mounts dockerd needs. Through
    a proxy dockerd need not resolve the registry's name (DESIGN.md: let only the node resolve it).
    """
    require_tools(DOCKERD_TOOLS)
    for directory in (daemon.workdir, daemon.etc_docker, daemon.run_dir):
        directory.mkdir(parents=True, exist_ok=True)
    enter = ["nsenter", f"--net=/run/netns/{netns}"] if netns is not None else []
    mounts = [(daemon.etc_docker, "/etc/docker"), *([(hosts, "/etc/hosts")] if hosts else [])]
    script = " && ".join(f'mount --bind "${i}" {target}' for i, (_, target) in enumerate(mounts, 1))
    argv = [
        "unshare", "--mount", "--propagation", "private", *enter,
        "sh", "-c", f'{script} && shift {len(mounts)} && exec "$@"', "sh", *(str(m[0]) for m in mounts),
        "dockerd", "--host", daemon.host, "--data-root", str(daemon.workdir / "data"),
        "--exec-root", str(daemon.run_dir / "exec"), "--pidfile", str(daemon.run_dir / "dockerd.pid"),
        "--storage-driver=vfs", "--iptables=false", "--ip-masq=false", "--bridge=none",
    ]  # fmt: skip

    async def healthy() -> bool:
        return (await daemon.docker("version", timeout=10))[0] == 0

    env = {"PATH": os.environ["PATH"], **proxy_env}
    return await started("dockerd", argv, daemon.log_path, healthy, spawn=spawn, env=env, timeout=timeout)


def log_events(text: str, event: str, **fields: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (shoal's daemons log that way) whose `event` field is
    `event` and whose other fields match `fields`."""
    records = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                records.append(record)
    return records


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text exposition; None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def metrics_text(url: str, context: ssl.SSLContext | None = None) -> str:
    """`url`'s Prometheus /metrics, over TLS verified with `context` for an https URL."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/metrics", ssl=context or False) as response,
    ):
        return await response.text()


async def read_metric(url: str, name: str, **labels: str) -> tuple[float | None, str]:
    """One sample of `url`'s /metrics (None when absent), and the whole text for messages."""
    text = await metrics_text(url)
    return metric_value(text, name, **labels), text
