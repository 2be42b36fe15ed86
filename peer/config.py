"""The peer's configuration: one frozen dataclass, filled by the entry point that embeds the peer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import Address, Duration, Size, parse_address


@dataclass(frozen=True)
class PeerConfig:
    cache_dir: Path = Path("/var/lib/shoal-node")  # blobs, partial downloads, seeding state
    cache_max_bytes: Size = 50 * 2**30  # complete blobs kept; least recently used evicted first
    peer_listen: Address = "0.0.0.0:6881"  # the SSL BitTorrent port (port 0: any free port)
    stall_timeout: Duration = 20  # no piece for this long: the stream asks the caller for the rest
    # Pieces ahead of a streaming reader that get a deadline. One: readers at the same position all
    # want the deadline pieces, so a deep window makes leechers fetch the same pieces from the seeder
    # in lock-step with nothing to trade (8 nodes, tests/bench/rollout.py: 16 took 2.8x as long as 1
    # for the swarm; 0, no deadlines, was no faster than 1).
    stream_window: int = 1
    upload_rate_limit: Size = 0  # bytes/s of peer upload, 0 for no limit (applies on the LAN too)

    def __post_init__(self) -> None:
        parse_address(self.peer_listen)
        if self.stall_timeout < 1:
            raise ValueError("stall_timeout: must be at least 1 second")
        if self.stream_window < 1:
            raise ValueError("stream_window: must be at least 1 piece")

    @property
    def listen_interfaces(self) -> str:
        """libtorrent's listen_interfaces for `peer_listen`; the `s` suffix makes it SSL-only."""
        host, port = parse_address(self.peer_listen)
        return f"[{host}]:{port}s" if ":" in host else f"{host}:{port}s"
