"""The tracker's configuration: one frozen dataclass tree, loaded once by the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.chunks import check_chunk_size
from common.config import Address, Duration, Size, Url


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TokenConfig:
    issuer: str
    service: str
    certs: Path  # the PEM bundle the registry itself uses as `rootcertbundle`


@dataclass(frozen=True)
class RegistryConfig:
    host: str  # as clients name it, "host:port"
    url: Url  # how the tracker reaches it
    ca: Path | None = None  # extra CA for the registry's TLS, on top of the system trust
    token: TokenConfig | None = None
    anonymous: bool = False  # allow joins without a credential (the registry's HEAD still decides)

    def __post_init__(self) -> None:
        if ":" not in self.host or "/" in self.host:
            raise ValueError(f'host must be "host:port" as clients name it, got {self.host!r}')


@dataclass(frozen=True)
class TrackerConfig:
    public_url: Url  # the URL nodes reach this tracker by; announce URLs are built from it
    tls: TLSConfig
    registries: tuple[RegistryConfig, ...]
    listen: Address = "0.0.0.0:8443"
    state_dir: Path = Path("/var/lib/shoal-tracker")
    store: str = "sqlite"  # or "redis://host:port/db" to share state between replicas
    peer_cert_ttl: Duration = 6 * 3600
    # Seconds without forward progress before a chunk lease is lost: nodes report every lease/4, so
    # a dead origin costs the swarm at most this long on one chunk.
    origin_lease: Duration = 20
    # 8 MiB: a chunk is published only once its origin has all of it, and an image's layers are
    # fetched in parallel, so chunk time is about layers x chunks_in_flight x chunk_size / link rate.
    # It must stay well under a node's stall_timeout. 8 nodes, 4 layers, 50 Mbit/s
    # (tests/bench/rollout.py): 32 MiB chunks took 43 s each, waiters gave up and the rollout took
    # 5.4 x S/B; 8 MiB took 1.7 x.
    chunk_size: Size = 8 * 2**20
    # Chunks of one blob leased at once: the registry serves at most this many in parallel, so its
    # bytes leave roughly in order and the first chunks are published early.
    chunks_in_flight: int = 4
    # Chunks coming from one registry at once over all its blobs: an image's layers are fetched in
    # parallel, and each chunk must take well under a node's stall_timeout (chunk time is about
    # registry_in_flight x chunk_size / the registry's link). 8 nodes, 4 layers, 50 Mbit/s
    # (tests/bench/rollout.py): 3 per blob (12 at once) took 16-70 s a chunk, waiters gave up.
    registry_in_flight: int = 6
    # A node fetching a chunk of a blob gets a second one at once only this long after the first:
    # the nodes of a rollout join within a second or so, and the first of them must not take every
    # chunk the registry may send at once (all onto its one downlink) while the others find none.
    lone_grace: Duration = 1
    announce_interval: Duration = 30
    # Entries one source address may have in a blob's peer list (newer announces replace older):
    # one node per address is the normal case, and a node that joined again keeps its old entry
    # for up to two intervals. Raise it only where several nodes really share one address.
    peers_per_address: int = 4
    upstream_timeout: Duration = 10
    basic_auth_cache: Duration = 60  # how long a registry's "yes" to Basic credentials is reused
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.registries:
            raise ValueError("registries: at least one registry is required")
        hosts = [r.host for r in self.registries]
        if len(set(hosts)) != len(hosts):
            raise ValueError("registries: a host is listed twice")
        if not (self.store == "sqlite" or self.store.startswith(("redis://", "rediss://"))):
            raise ValueError(f'store: "sqlite" or a redis:// URL, got {self.store!r}')
        if self.announce_interval < 1 or self.origin_lease < 1 or self.peer_cert_ttl < 60:
            raise ValueError("announce_interval, origin_lease >= 1 s and peer_cert_ttl >= 60 s")
        try:
            check_chunk_size(self.chunk_size)
        except ValueError as exc:
            raise ValueError(f"chunk_size: {exc}") from None
        if self.chunks_in_flight < 1 or self.registry_in_flight < 1:
            raise ValueError("chunks_in_flight and registry_in_flight must be at least 1")
        if self.peers_per_address < 1:
            raise ValueError("peers_per_address must be at least 1")

    def registry(self, host: str) -> RegistryConfig | None:
        return next((r for r in self.registries if r.host == host), None)
