"""The node announces its torrents to the tracker itself and dials the peers it names.

libtorrent talks to no tracker: for SSL torrents it checks an HTTPS tracker's certificate against
the swarm CA (not `tracker_ca`), and it binds announces to each listen interface. The node's own
client verifies the tracker with `tracker_ca`, and the tracker sees the node's address.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from common.ids import Digest
from peer.engine import ChunkedBlob, Peer
from peer.session import PeerError
from tracker.client import TrackerClient, TrackerRefused, TrackerUnavailable

logger = logging.getLogger(__name__)

TICK = 1.0
# A leecher that knows too few peers asks again soon: the swarm grows fastest at the start.
HUNGRY_PEERS = 3
HUNGRY_INTERVAL = 2.0
RETRY_INTERVAL = 5.0


@dataclass
class Schedule:
    """When each blob announces next: pure, so the rules are tested without a tracker."""

    due: dict[Digest, float] = field(default_factory=dict)

    def pending(self, present: list[Digest], now: float) -> list[Digest]:
        for gone in set(self.due) - set(present):
            del self.due[gone]
        return [d for d in present if self.due.setdefault(d, now) <= now]

    def answered(self, digest: Digest, now: float, interval: int, peers: int, seeding: bool) -> None:
        hungry = not seeding and peers < HUNGRY_PEERS
        self.due[digest] = now + (min(HUNGRY_INTERVAL, interval) if hungry else interval)

    def failed(self, digest: Digest, now: float) -> None:
        self.due[digest] = now + RETRY_INTERVAL


class Announcer:
    def __init__(self, peer: Peer, tracker: TrackerClient) -> None:
        self._peer = peer
        self._tracker = tracker
        self._schedule = Schedule()

    async def run(self) -> None:
        while True:
            blobs = {blob.digest: blob for blob in self._peer.blobs()}
            due = self._schedule.pending(list(blobs), time.monotonic())
            await asyncio.gather(*(self._announce(blobs[digest]) for digest in due))
            await asyncio.sleep(TICK)

    async def _announce(self, blob: ChunkedBlob) -> None:
        """One announce per blob, not per chunk torrent: the tracker keeps peers per blob."""
        try:
            left = blob.left()
            answer = await self._tracker.announce(
                blob.announce, blob.digest.swarm_id, self._peer.port, left, blob.uploaded()
            )
        except (TrackerUnavailable, TrackerRefused, PeerError) as exc:
            logger.warning("announce failed: %s", exc, extra={"digest": str(blob.digest)})
            self._schedule.failed(blob.digest, time.monotonic())
            return
        for host, port in answer.peers:
            blob.connect(host, port)
        self._schedule.answered(blob.digest, time.monotonic(), answer.interval, len(answer.peers), left == 0)
