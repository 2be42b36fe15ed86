"""Pure decisions about one blob's swarm: who fetches it from the registry, who waits, who leeches.

`BlobState` is what the store keeps per blob; each function takes a state and returns the next one,
so the store can apply them atomically (SQLite transaction or Redis WATCH/MULTI) and the rules are
tested without sockets.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum


class Role(StrEnum):
    LEECHER = "leecher"
    ORIGIN = "origin"
    WAIT = "wait"


@dataclass(frozen=True)
class Lease:
    """The origin's right to publish the torrent, kept alive by reporting progress."""

    node: str
    token: str
    expires_at: float
    bytes_done: int = 0


@dataclass(frozen=True)
class BlobState:
    size: int | None = None  # as the registry reported it when authorizing the origin
    torrent: bytes | None = None  # published metainfo
    info_hash: str | None = None  # hex of the truncated v2 info-hash peers announce
    publisher: str | None = None
    lease: Lease | None = None
    barred: frozenset[str] = field(default_factory=frozenset)  # never origin again for this blob

    def to_json(self) -> str:
        return json.dumps(
            {
                "size": self.size,
                "torrent": base64.b64encode(self.torrent).decode() if self.torrent else None,
                "info_hash": self.info_hash,
                "publisher": self.publisher,
                "lease": self.lease.__dict__ if self.lease else None,
                "barred": sorted(self.barred),
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes | None) -> BlobState:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            size=data["size"],
            torrent=base64.b64decode(data["torrent"]) if data["torrent"] else None,
            info_hash=data["info_hash"],
            publisher=data["publisher"],
            lease=Lease(**data["lease"]) if data["lease"] else None,
            barred=frozenset(data["barred"]),
        )


# A waiter asks again this often: it becomes a leecher at most this long after the origin publishes
# (each second of delay is a second of every waiter's pull). N waiters cost N joins a second.
WAIT_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Decision:
    role: Role
    lease: Lease | None = None
    retry_after: float = 0.0
    origin_bytes: int | None = None  # wait: how far the origin has got, so waiters see progress


class LeaseLost(Exception):
    """The caller does not hold the blob's origin lease (expired, withdrawn or never held)."""


def decide_join(
    state: BlobState, node: str, size: int, token: str, now: float, lease_seconds: float
) -> tuple[Decision, BlobState]:
    """Leecher once a torrent exists; else origin unless a live lease is someone else's."""
    if state.torrent is not None:
        return Decision(Role.LEECHER), state
    lease = state.lease
    if lease is not None and lease.expires_at > now:
        if lease.node == node:
            return Decision(Role.ORIGIN, lease), state
        wait = min(lease.expires_at - now, WAIT_RETRY_SECONDS)
        return Decision(Role.WAIT, retry_after=wait, origin_bytes=lease.bytes_done), state
    if node in state.barred:
        return Decision(Role.WAIT, retry_after=lease_seconds), state
    granted = Lease(node=node, token=token, expires_at=now + lease_seconds)
    return Decision(Role.ORIGIN, granted), replace(state, size=size, lease=granted)


def record_progress(
    state: BlobState, token: str, bytes_done: int, now: float, lease_seconds: float
) -> BlobState:
    """Extend the lease only when the origin moved forward: a stuck origin loses it."""
    lease = _held_lease(state, token, now)
    if bytes_done <= lease.bytes_done:
        return state
    renewed = replace(lease, bytes_done=bytes_done, expires_at=now + lease_seconds)
    return replace(state, lease=renewed)


def publish(state: BlobState, token: str, torrent: bytes, info_hash: str, now: float) -> BlobState:
    lease = _held_lease(state, token, now)
    return replace(state, torrent=torrent, info_hash=info_hash, publisher=lease.node, lease=None)


def withdraw(state: BlobState) -> BlobState:
    """A published torrent whose bytes do not match the digest: drop it, bar its publisher."""
    barred = state.barred | ({state.publisher} if state.publisher else set())
    return BlobState(size=state.size, barred=frozenset(barred))


def _held_lease(state: BlobState, token: str, now: float) -> Lease:
    lease = state.lease
    if lease is None or lease.token != token or lease.expires_at <= now:
        raise LeaseLost("no live origin lease with that token")
    return lease


@dataclass(frozen=True)
class Peer:
    node: str
    ip: str
    port: int
    seeding: bool
    expires_at: float


@dataclass(frozen=True)
class SwarmView:
    peers: list[Peer]
    complete: int
    incomplete: int


def view_swarm(peers: Iterable[Peer], asking: str, seeding: bool, numwant: int, now: float) -> SwarmView:
    """The peers an announce returns: live ones other than the asker, no seeders to a seeder."""
    live = [p for p in peers if p.expires_at > now]
    complete = sum(p.seeding for p in live)
    candidates = [p for p in live if p.node != asking and not (seeding and p.seeding)]
    chosen = random.sample(candidates, min(numwant, len(candidates)))
    return SwarmView(chosen, complete, len(live) - complete)
