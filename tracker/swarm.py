"""Pure decisions about one blob's swarm: which joiner fetches which chunk from the registry, what a
node has not seen yet, when a published chunk goes back to being fetched, and which peers an
announce names.

A blob is a list of chunks (`common.chunks.plan`), each its own torrent. `BlobState` is what the
store keeps per blob; each function takes a state and returns the next one, so the store applies
them atomically (SQLite transaction or Redis WATCH/MULTI) and the rules are tested without sockets.

Leases, published chunks, joiners and peer entries belong to a *member* (`Member`, kept as its
string): the key a node joined with, beside the node id it named.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from common.chunks import Chunk, plan
from common.ids import NodeId

# A node's `sync` long-polls at most this long, then asks again.
MAX_SYNC_WAIT = 30.0
# A joiner counts as active (one whose want of a lease keeps others from taking a second one) this
# long after its last join or sync: longer than one long-poll, so a node waiting in `sync` is active.
ACTIVE_JOINER_SECONDS = MAX_SYNC_WAIT + 15
# A joiner's last-seen time is rewritten at most this often: a long-poll re-checks the state four
# times a second and must not write the store each time.
SEEN_GRANULARITY = 5.0


@dataclass(frozen=True)
class Member:
    """Who takes part in a blob's swarm. A node id is only a name, and anyone with a pull credential
    may join under any name; the key is what only its holder can use (the CSR's self-signature
    proves it, and the announce key the join hands out is signed for the member). Two joins naming
    one node id with different keys are two members: neither gets, extends, announces, evicts or
    reports as the other. A node makes a new key for every join, so each join is a member of its
    own."""

    node: NodeId
    key: str  # hex SHA-256 of the joining key's DER SubjectPublicKeyInfo (`common.certs.key_id`)

    def __str__(self) -> str:
        return f"{self.node}~{self.key}"  # "~" occurs in neither


def node_of(member: str) -> str:
    """The node id a member string names."""
    return member.partition("~")[0]


@dataclass(frozen=True)
class Lease:
    """A member's right to publish one chunk, kept alive by reporting forward progress."""

    member: str
    token: str
    expires_at: float
    bytes_done: int = 0
    granted_at: float = 0.0


@dataclass(frozen=True)
class Torrent:
    """A published chunk torrent."""

    metainfo: bytes
    info_hash: str  # hex of its truncated v2 info-hash
    publisher: str  # the member
    published_at: float


@dataclass(frozen=True)
class ChunkState:
    torrent: Torrent | None = None
    verified: bool = False  # its pieces root matched the registry's bytes on a report
    lease: Lease | None = None
    # Node ids whose members published wrong bytes for it: never leased it again. A bar names the
    # node, not the key, as a node makes a new key for every join; naming another node's id in a
    # join can then only bar that node from fetching this chunk from the registry, which another
    # joiner does instead.
    barred: frozenset[str] = frozenset()

    def free_for(self, member: str) -> bool:
        return self.torrent is None and self.lease is None and node_of(member) not in self.barred

    def unpublished(self) -> ChunkState:
        """Back to needing an origin; who is barred stays barred."""
        return ChunkState(barred=self.barred)

    def to_dict(self) -> dict[str, Any]:
        torrent = self.torrent
        return {
            "torrent": base64.b64encode(torrent.metainfo).decode() if torrent else None,
            "info_hash": torrent.info_hash if torrent else None,
            "publisher": torrent.publisher if torrent else None,
            "published_at": torrent.published_at if torrent else None,
            "verified": self.verified,
            "lease": self.lease.__dict__ if self.lease else None,
            "barred": sorted(self.barred),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkState:
        torrent = None
        if data["torrent"] is not None:
            metainfo = base64.b64decode(data["torrent"])
            torrent = Torrent(metainfo, data["info_hash"], data["publisher"], data["published_at"])
        return cls(
            torrent=torrent,
            verified=data["verified"],
            lease=_lease(data["lease"]),
            barred=frozenset(data["barred"]),
        )


def _lease(data: dict[str, Any] | None) -> Lease | None:
    """A lease stored before members held a bare node id, which no member matches: it is dropped,
    as it would have expired within `origin_lease` anyway."""
    return Lease(**data) if data and "member" in data else None


@dataclass(frozen=True)
class BlobState:
    size: int | None = None  # as the registry reported it when authorizing the first joiner
    chunk_size: int | None = None  # fixed at the first join, so a config change never re-cuts a blob
    chunks: tuple[ChunkState, ...] = ()  # by chunk index
    joiners: Mapping[str, float] = field(default_factory=dict)  # active member -> last seen
    registry: str | None = None  # the registry host of the first join: whose link its chunks share

    def plan(self) -> list[Chunk]:
        if self.size is None or self.chunk_size is None:
            return []
        return plan(self.size, self.chunk_size)

    def leases_of(self, member: str) -> list[tuple[int, Lease]]:
        return [
            (i, c.lease)
            for i, c in enumerate(self.chunks)
            if c.lease is not None and c.lease.member == member
        ]

    def fetching(self) -> list[Lease]:
        """Leases whose chunk is still coming from the registry."""
        return _fetching_leases(list(self.chunks), [chunk.length for chunk in self.plan()])

    def published(self) -> list[tuple[int, Torrent]]:
        return [(i, c.torrent) for i, c in enumerate(self.chunks) if c.torrent is not None]

    def to_json(self) -> str:
        return json.dumps(
            {
                "size": self.size,
                "chunk_size": self.chunk_size,
                "registry": self.registry,
                "chunks": [chunk.to_dict() for chunk in self.chunks],
                "joiners": dict(self.joiners),
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes | None) -> BlobState:
        if not text:
            return cls()
        data = json.loads(text)
        if "chunks" not in data:
            # A whole-blob torrent from before chunks: no node can use it, so start the blob afresh.
            return cls()
        return cls(
            size=data["size"],
            chunk_size=data["chunk_size"],
            registry=data.get("registry"),
            chunks=tuple(ChunkState.from_dict(chunk) for chunk in data["chunks"]),
            joiners=data["joiners"],
        )


@dataclass(frozen=True)
class Rules:
    lease_seconds: float  # `origin_lease`
    chunks_in_flight: int
    announce_interval: float
    lone_grace: float  # a node's next chunk of a blob at once comes this long after its last
    registry_in_flight: int  # chunks coming from one registry at once, over all its blobs


@dataclass(frozen=True)
class Elsewhere:
    """What the blob's registry is busy with on its other blobs: chunks coming from it, how many of
    its other blobs being fetched have none coming, and the nodes fetching them (by when each last
    got a lease). Node ids here only spread the load, they grant nothing."""

    fetching: int = 0
    idle: int = 0  # blobs being fetched with no chunk coming from the registry now
    nodes: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Visit:
    """What a join or sync of one member decided."""

    leases: list[tuple[int, Lease]]  # every live lease the member holds on the blob
    granted: list[int]  # chunk indices newly leased to it in this visit
    reset: list[int]  # published chunks unpublished because their swarm was dead


class LeaseLost(Exception):
    """The caller does not hold that chunk lease (expired, withdrawn or never held)."""


def start(state: BlobState, size: int, chunk_size: int, registry: str | None = None) -> BlobState:
    """The blob's chunks, planned at its first join; later joins keep the plan."""
    if state.size is not None:
        return state
    chunks = tuple(ChunkState() for _ in plan(size, chunk_size))
    return BlobState(size, chunk_size, chunks, state.joiners, registry)


def visit(
    state: BlobState,
    member: str,
    now: float,
    rules: Rules,
    swarm: SwarmView | None,
    new_token: Callable[[], str],
    elsewhere: Elsewhere | None = None,
) -> tuple[Visit, BlobState]:
    """A join or sync by `member`: drop expired leases, reset a dead swarm, note the member as
    active, grant it leases. `swarm` is the blob's scrape; None means "not looked at" (a long-poll
    re-check), so nothing is reset."""
    state = _drop_expired(state, now)
    reset: list[int] = []
    if swarm is not None and swarm.complete + swarm.incomplete == 0:
        reset, state = _reset_dead(state, now, rules.announce_interval)
    state = _seen(state, member, now)
    granted, state = _grant(state, member, now, rules, new_token, elsewhere or Elsewhere())
    return Visit(state.leases_of(member), granted, reset), state


def _drop_expired(state: BlobState, now: float) -> BlobState:
    """An origin killed mid-chunk loses it: the chunk is free for the next joiner."""
    if not any(c.lease is not None and c.lease.expires_at <= now for c in state.chunks):
        return state
    chunks = tuple(
        replace(c, lease=None) if c.lease is not None and c.lease.expires_at <= now else c
        for c in state.chunks
    )
    return replace(state, chunks=chunks)


def _reset_dead(state: BlobState, now: float, interval: float) -> tuple[list[int], BlobState]:
    """No live peer at all in the blob's swarm: nobody can serve its published chunks, so they get
    new origins instead of every joiner stalling and going to the registry on its own. A chunk
    published within one announce interval is spared: its publisher may not have announced yet."""
    stale = [i for i, torrent in state.published() if torrent.published_at <= now - interval]
    if not stale:
        return [], state
    chunks = tuple(c.unpublished() if i in stale else c for i, c in enumerate(state.chunks))
    return stale, replace(state, chunks=chunks)


def _seen(state: BlobState, member: str, now: float) -> BlobState:
    """Record `member` as active and forget joiners that are not."""
    last = state.joiners.get(member)
    inactive = [n for n, seen in state.joiners.items() if seen <= now - ACTIVE_JOINER_SECONDS]
    if last is not None and last > now - SEEN_GRANULARITY and not inactive:
        return state
    joiners = {n: seen for n, seen in state.joiners.items() if n not in inactive}
    joiners[member] = now if last is None or last <= now - SEEN_GRANULARITY else last
    return replace(state, joiners=joiners)


def _grant(
    state: BlobState,
    member: str,
    now: float,
    rules: Rules,
    new_token: Callable[[], str],
    elsewhere: Elsewhere,
) -> tuple[list[int], BlobState]:
    """Lease `member` the lowest-index free chunks while fewer than `chunks_in_flight` are still
    coming from the registry, and the registry's slots allow: `registry_in_flight` over all its
    blobs, a blob that has one leaving a slot to each blob being fetched that has none (each chunk
    must take a short time even when an image's layers are fetched in parallel: a chunk is
    published only once complete). A member whose node is already fetching a chunk (of this blob
    or of another of the registry's) gets another only `lone_grace` after its node's newest
    lease, and a second one of this blob only when no other active joiner that could take a chunk
    is fetching none. A lease whose bytes have all arrived (its origin hashes and publishes the
    chunk) no longer counts: the registry's link goes on to the next chunk meanwhile. (A joiner
    that has the whole blob stops syncing but counts as active for a while: only the second chunk
    of one blob waits for it, never a node's first.)"""
    chunks = list(state.chunks)
    lengths = [chunk.length for chunk in state.plan()]
    granted: list[int] = []
    while len(leases := _fetching_leases(chunks, lengths)) < rules.chunks_in_flight:
        reserved = elsewhere.idle if leases else 0  # a slot kept for each blob with none
        if len(leases) + elsewhere.fetching + reserved >= rules.registry_in_flight:
            break
        free = [i for i, c in enumerate(chunks) if c.free_for(member)]
        if not free:
            break
        newest = _newest_fetch(leases, member, elsewhere)
        if newest is not None and newest > now - rules.lone_grace:
            break
        fetchers = {lease.member for lease in leases}
        if member in fetchers and _another_waits(chunks, fetchers, state.joiners, member, now, elsewhere):
            break
        lease = Lease(member, new_token(), now + rules.lease_seconds, granted_at=now)
        chunks[free[0]] = replace(chunks[free[0]], lease=lease)
        granted.append(free[0])
    return granted, replace(state, chunks=tuple(chunks)) if granted else state


def _fetching_leases(chunks: list[ChunkState], lengths: list[int]) -> list[Lease]:
    """Leases whose chunk is still coming from the registry."""
    return [
        c.lease
        for c, length in zip(chunks, lengths, strict=True)
        if c.lease is not None and c.lease.bytes_done < length
    ]


def _newest_fetch(leases: list[Lease], member: str, elsewhere: Elsewhere) -> float | None:
    """When the member's node last got a lease it is still fetching, on this blob (`leases`) or on
    the registry's others; None when it fetches none."""
    here = [lease.granted_at for lease in leases if lease.member == member]
    there = elsewhere.nodes.get(node_of(member))
    return max([*here, *([] if there is None else [there])], default=None)


def _another_waits(
    chunks: list[ChunkState],
    fetchers: set[str],
    joiners: Mapping[str, float],
    member: str,
    now: float,
    elsewhere: Elsewhere,
) -> bool:
    """Some other active joiner is fetching no chunk from the registry (of this blob: not among
    `fetchers`; nor of another) and could take a free one."""
    return any(
        other != member
        and seen > now - ACTIVE_JOINER_SECONDS
        and other not in fetchers
        and node_of(other) not in elsewhere.nodes
        and any(c.free_for(other) for c in chunks)
        for other, seen in joiners.items()
    )


def leased_chunk(state: BlobState, index: int, token: str, now: float) -> Chunk:
    """The chunk whose live lease `token` is, or `LeaseLost`."""
    chunks = state.plan()
    if not 0 <= index < len(chunks):
        raise LeaseLost(f"chunk {index} does not exist")
    lease = state.chunks[index].lease
    if lease is None or lease.token != token or lease.expires_at <= now:
        raise LeaseLost(f"no live lease on chunk {index} with that token")
    return chunks[index]


def record_progress(
    state: BlobState, token: str, bytes_done: int, now: float, lease_seconds: float
) -> tuple[bool, BlobState]:
    """Extend the lease `token` only when its origin moved forward: a stuck origin loses it. True
    when this report says the chunk's last byte arrived: a registry slot came free."""
    for index, (chunk, planned) in enumerate(zip(state.chunks, state.plan(), strict=True)):
        lease = chunk.lease
        if lease is not None and lease.token == token and lease.expires_at > now:
            bytes_done = min(bytes_done, planned.length)
            if bytes_done <= lease.bytes_done:
                return False, state
            renewed = replace(lease, bytes_done=bytes_done, expires_at=now + lease_seconds)
            return bytes_done == planned.length, _with_chunk(state, index, replace(chunk, lease=renewed))
    raise LeaseLost("no live chunk lease with that token")


def publish(
    state: BlobState, index: int, token: str, metainfo: bytes, info_hash: str, now: float
) -> BlobState:
    """The chunk's torrent is out; its lease is freed for the next chunk."""
    leased_chunk(state, index, token, now)
    chunk = state.chunks[index]
    assert chunk.lease is not None  # leased_chunk checked it
    torrent = Torrent(metainfo, info_hash, chunk.lease.member, now)
    return _with_chunk(state, index, ChunkState(torrent=torrent, barred=chunk.barred))


def news(state: BlobState, known: Iterable[str]) -> tuple[list[int], list[str]]:
    """What a node that has the chunk torrents `known` has not seen: published chunks it lacks, and
    the ones it has that are no longer published (withdrawn or reset)."""
    known = set(known)
    published = state.published()
    fresh = [i for i, torrent in published if torrent.info_hash not in known]
    return fresh, sorted(known - {torrent.info_hash for _, torrent in published})


def to_verify(state: BlobState) -> list[tuple[int, Torrent]]:
    """Published chunks a digest-mismatch report may blame: those not already checked."""
    return [(i, c.torrent) for i, c in enumerate(state.chunks) if c.torrent is not None and not c.verified]


def apply_verdicts(state: BlobState, verdicts: Mapping[int, tuple[str, bool]]) -> tuple[list[int], BlobState]:
    """Chunk index -> (info hash checked, whether it matched the registry's bytes): a match marks
    the chunk verified, a mismatch withdraws it and bars its publisher from it. A chunk published
    anew since the check (another info hash) is left alone. Returns the withdrawn indices."""
    withdrawn = []
    chunks = list(state.chunks)
    for index, (info_hash, matches) in sorted(verdicts.items()):
        chunk = chunks[index]
        if chunk.torrent is None or chunk.torrent.info_hash != info_hash:
            continue
        if matches:
            chunks[index] = replace(chunk, verified=True)
        else:
            chunks[index] = ChunkState(barred=chunk.barred | {node_of(chunk.torrent.publisher)})
            withdrawn.append(index)
    return withdrawn, replace(state, chunks=tuple(chunks))


def next_expiry(state: BlobState, now: float, rules: Rules) -> float | None:
    """When a long-poll re-decides without news: the earliest lease runs out (a chunk may come
    free), or a lease's `lone_grace` ends (its node may take another)."""
    leases = [c.lease for c in state.chunks if c.lease is not None]
    graces = [lease.granted_at + rules.lone_grace for lease in leases]
    return min([lease.expires_at for lease in leases] + [t for t in graces if t > now], default=None)


def _with_chunk(state: BlobState, index: int, chunk: ChunkState) -> BlobState:
    return replace(state, chunks=(*state.chunks[:index], chunk, *state.chunks[index + 1 :]))


@dataclass(frozen=True)
class Peer:
    member: str
    ip: str  # the address its announce came from
    port: int
    seeding: bool
    expires_at: float  # every entry lives as long past its announce, so also the announce order
    uploaded: int = 0  # bytes it says it sent to peers (BEP 3 `uploaded`)


@dataclass(frozen=True)
class SwarmView:
    peers: list[Peer]
    complete: int
    incomplete: int


def displaced(peers: Iterable[Peer], newest: Peer, per_address: int) -> list[str]:
    """The members whose entries an announce by `newest` replaces: those at its address and port
    (the same listener: a node that joined again), and those beyond the `per_address` latest
    announces from its address. One machine, however many keys it joins with, then fills at most
    `per_address` places in a blob's peer list, and never pushes out a peer at another address."""
    same = [p for p in peers if p.ip == newest.ip and p.member != newest.member]
    same.sort(key=lambda p: p.expires_at, reverse=True)
    others = [p for p in same if p.port != newest.port]
    return [p.member for p in same if p.port == newest.port] + [p.member for p in others[per_address - 1 :]]


def view_swarm(peers: Iterable[Peer], asking: str, seeding: bool, numwant: int, now: float) -> SwarmView:
    """The peers an announce returns: live ones other than the asker, no seeders to a seeder; those
    known to serve first (`_serving`), at random within each rank, so that the load spreads."""
    live = [p for p in peers if p.expires_at > now]
    complete = sum(p.seeding for p in live)
    ranks: list[list[Peer]] = [[], [], []]
    for p in live:
        if p.member != asking and not (seeding and p.seeding):
            ranks[_serving(p)].append(p)
    chosen: list[Peer] = []
    for rank in ranks:
        chosen += random.sample(rank, min(numwant - len(chosen), len(rank)))
    return SwarmView(chosen, complete, len(live) - complete)


def _serving(peer: Peer) -> int:
    """0 for a seeder, 1 for a peer that has sent bytes, 2 for one that has sent none yet (a fresh
    joiner, or one of many keys that fetch nothing and serve nothing): when a swarm is larger than
    an answer, a newcomer meets the peers that can give it something."""
    return 0 if peer.seeding else 1 if peer.uploaded > 0 else 2
