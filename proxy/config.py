"""The node's configuration: one frozen dataclass tree, loaded once by the entry point."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from common.config import Address, Duration, Size, Url, parse_address
from common.ids import NodeId, is_decimal


def split_host_port(text: str) -> tuple[str, int]:
    """`"name:port"` or `"[v6]:port"` into a lowercase host and a port; raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not is_decimal(port) or not 0 < int(port) <= 65535:
        raise ValueError(f'expected "host:port", got {text[:100]!r}')
    if host.startswith("[") != host.endswith("]") or "/" in host or any(c.isspace() for c in host):
        raise ValueError(f'expected "host:port", got {text[:100]!r}')
    return host.lower(), int(port)


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class NodeRegistry:
    host: str  # "host:port" as dockerd names it (the CONNECT target); its name is what TLS verifies
    url: Url | None = None  # where the node connects; default https://<host> (http:// when insecure)
    ca: Path | None = None  # extra CA for the registry's TLS, on top of the system trust
    insecure: bool = False  # plain HTTP, as dockerd's insecure-registries

    def __post_init__(self) -> None:
        name, port = split_host_port(self.host)
        object.__setattr__(self, "host", f"{name}:{port}")
        if self.url is not None and urlsplit(self.url).path not in ("", "/"):
            raise ValueError(
                f"url: scheme://host:port only, the registry API lives at /v2/, got {self.url!r}"
            )

    @property
    def name(self) -> str:
        """The host name without port (IPv6 without brackets): what the certificate must name."""
        return self.host.rpartition(":")[0].removeprefix("[").removesuffix("]")

    @property
    def base_url(self) -> str:
        return self.url or f"{'http' if self.insecure else 'https'}://{self.host}"


@dataclass(frozen=True)
class NodeConfig:
    listen: Address = "127.0.0.1:65001"  # the proxy dockerd's HTTPS_PROXY names; loopback only
    admin: Address = "127.0.0.1:65002"  # /healthz, /metrics, /status
    tracker: Url | None = None  # the cluster's tracker; without one every layer comes from the registry
    tracker_ca: Path | None = None  # CA that signed the tracker's HTTPS certificate
    node_id: str = field(default_factory=socket.gethostname)  # this node's name in the swarm
    cache_dir: Path = Path("/var/lib/shoal-node")  # verified blobs kept for seeding
    cache_max_bytes: Size = 50 * 2**30  # the cache evicts least recently used blobs beyond this
    peer_listen: Address = "0.0.0.0:6881"  # BitTorrent listen address for other nodes
    peer_upload_limit: Size = 0  # bytes/s this node uploads to peers; 0 for no limit
    docker_certs_dir: Path = Path("/etc/docker/certs.d")  # where dockerd reads registry trust
    p2p_min_bytes: Size = 2**20  # smaller blobs always come straight from the registry
    stall_timeout: Duration = 20  # a swarm silent this long falls back to the registry
    origin_connections: int = 2  # registry connections at once for each chunk this node fetches for the swarm
    shutdown_grace: Duration = 30  # on SIGTERM, how long responses in flight may take to finish
    log_level: str = "info"
    registries: tuple[NodeRegistry, ...] = ()  # the registries whose traffic the node intercepts

    def __post_init__(self) -> None:
        host, _port = parse_address(self.listen)
        if not is_loopback(host):
            raise ValueError(f"listen: must be a loopback address, got {self.listen!r}")
        try:
            NodeId.parse(self.node_id)
        except ValueError as exc:
            raise ValueError(f"node_id: {exc}") from None
        hosts = [r.host for r in self.registries]
        if len(set(hosts)) != len(hosts):
            raise ValueError("registries: a host is listed twice")
        if self.origin_connections < 1:
            raise ValueError("origin_connections: must be at least 1")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level: one of debug, info, warning, error, got {self.log_level!r}")

    def registry(self, host: str) -> NodeRegistry | None:
        """The configured registry for a `"host:port"` as a client named it, or None."""
        return next((r for r in self.registries if r.host == host.lower()), None)
