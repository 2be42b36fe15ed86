"""A real CNCF distribution registry (Debian `docker-registry`) with TLS and `auth: token`.

The registry's access log (combined log format on stdout) is the record of what it served: tests
count layer downloads and registry egress from it. A line is written when the handler returns,
which can be after the client has read the whole body, so counting first waits for a marker
request of our own to appear in the log (`flush_log`).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp
import yaml

from common.certs import CertificateAuthority
from lab.pki import LOOPBACK, REGISTRY_NAME, issue_server_files, write_ca
from lab.services import Service, Spawn, free_port, http_status, log_tail, spawn_here, started
from lab.tokens import TokenIssuer

BINARY = Path("/usr/bin/docker-registry")

# 127.0.0.1 - - [23/Nov/2026:08:50:50 +0000] "GET /v2/ HTTP/2.0" 401 87 "" "curl/7.88.1"
ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<size>\d+|-)'
)


@dataclass(frozen=True)
class AccessLogEntry:
    method: str
    path: str  # without the query string
    status: int
    size: int  # body bytes written


def parse_access_log(text: str) -> list[AccessLogEntry]:
    entries = []
    for line in text.splitlines():
        match = ACCESS_LINE.match(line)
        if match is None:
            continue
        size = match["size"]
        entries.append(
            AccessLogEntry(
                method=match["method"],
                path=match["uri"].partition("?")[0],
                status=int(match["status"]),
                size=0 if size == "-" else int(size),
            )
        )
    return entries


class Registry:
    """Started on entry, stopped on exit. Clients name it `host`; tests connect to `url`."""

    def __init__(
        self,
        workdir: Path,
        ca: CertificateAuthority,
        issuer: TokenIssuer,
        realm: str,
        *,
        port: int | None = None,
        startup_timeout: float = 20.0,
        listen_ip: str = LOOPBACK,
        url: str | None = None,
        spawn: Spawn = spawn_here,
    ) -> None:
        """`listen_ip`, `url` and `spawn` place it elsewhere, e.g. in a lab namespace: it listens
        on `listen_ip:port`, is started by `spawn` (`Network.spawner(host)`), and the tests reach
        it at `url` (default `https://127.0.0.1:<port>`)."""
        if not BINARY.exists():
            raise RuntimeError(f"{BINARY} not found: install Debian package docker-registry")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.host = f"{REGISTRY_NAME}:{self.port}"
        self.listen_ip = listen_ip
        self.url = url if url is not None else f"https://{LOOPBACK}:{self.port}"
        self.spawn = spawn
        self.issuer = issuer
        self.service = issuer.service
        self.issuer_name = issuer.issuer_name
        self.realm = realm
        self.ca_pem = write_ca(ca, workdir / "ca.crt")
        self.tls = issue_server_files(
            ca, workdir, "registry", *dict.fromkeys((REGISTRY_NAME, LOOPBACK, listen_ip))
        )
        self.certs_bundle = issuer.write_bundle(workdir / "token-certs.pem")
        self.storage = workdir / "storage"
        self.log = workdir / "registry.log"
        self.config_path = workdir / "config.yml"
        self.startup_timeout = startup_timeout
        self._service: Service | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """Client context that verifies the registry (and the token realm) against the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_pem))

    def config(self) -> dict[str, object]:
        return {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{self.listen_ip}:{self.port}",
                "secret": secrets.token_hex(16),
                "tls": {"certificate": str(self.tls.cert), "key": str(self.tls.key)},
            },
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": self.service,
                    "issuer": self.issuer_name,
                    "rootcertbundle": str(self.certs_bundle),
                }
            },
        }

    async def __aenter__(self) -> Registry:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        argv = [str(BINARY), "serve", str(self.config_path)]
        self._service = await started(
            "docker-registry", argv, self.log, self._ready, spawn=self.spawn,
            env={"PATH": os.environ["PATH"]}, timeout=self.startup_timeout,
        )  # fmt: skip
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _ready(self) -> bool:
        """Ready when `GET /v2/` answers 401: TLS is up and token auth is configured."""
        status = await http_status(f"{self.url}/v2/", self.ssl_context())
        if status != 401:
            raise RuntimeError(f"GET /v2/ answered {status}, expected 401")
        return True

    @property
    def pid(self) -> int:
        if self._service is None:
            raise RuntimeError("the registry is not running")
        return self._service.pid

    async def stop(self) -> None:
        service, self._service = self._service, None
        if service is not None:
            await service.stop(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log, lines)

    def access_log(self) -> list[AccessLogEntry]:
        return parse_access_log(self.log.read_text(errors="replace"))

    async def flush_log(self, timeout: float = 10.0) -> None:
        """Return once requests completed before this call are in the access log."""
        marker = f"shoal-log-barrier={uuid.uuid4().hex}"
        connector = aiohttp.TCPConnector(ssl=self.ssl_context())
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"{self.url}/v2/?{marker}") as response,
        ):
            await response.read()
        deadline = asyncio.get_running_loop().time() + timeout
        while marker not in self.log.read_text(errors="replace"):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"barrier request never reached the registry log {self.log}")
            await asyncio.sleep(0.01)

    async def blob_gets(self, digest: str) -> list[AccessLogEntry]:
        """Successful `GET /v2/<repo>/blobs/<digest>` (200 or 206), any repository."""
        await self.flush_log()
        suffix = f"/blobs/{digest}"
        return [
            entry
            for entry in self.access_log()
            if entry.method == "GET"
            and entry.path.startswith("/v2/")
            and entry.path.endswith(suffix)
            and entry.status in (200, 206)
        ]

    async def blob_get_count(self, digest: str) -> int:
        return len(await self.blob_gets(digest))

    async def blob_bytes_sent(self, digest: str) -> int:
        """Body bytes the registry wrote for this blob (registry egress for it)."""
        return sum(entry.size for entry in await self.blob_gets(digest))
