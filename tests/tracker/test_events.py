"""The tracker's in-process view of how busy each registry is."""

from __future__ import annotations

from common.ids import Digest
from tracker.events import ACTIVE_SECONDS, RegistryLoad
from tracker.swarm import BlobState, ChunkState, Elsewhere, Lease, Torrent

A, B, C = (Digest(c * 64) for c in "abc")
MIB = 2**20
DONE = Torrent(b"meta", "00" * 20, "x~k", 0)


def state(registry: str, *leases: Lease | None, published: int = 0) -> BlobState:
    chunks = [ChunkState(lease=lease) for lease in leases] + [ChunkState(torrent=DONE)] * published
    return BlobState(len(chunks) * MIB, MIB, tuple(chunks), {}, registry)


def test_a_registrys_load_counts_the_other_blobs_being_fetched() -> None:
    load = RegistryLoad()
    load.note(
        A, state("r:5000", Lease("n1~k", "t", 10, granted_at=1), Lease("n2~k", "t", 30, granted_at=2)), 0
    )
    load.note(B, state("r:5000", Lease("n1~k", "t", 30, granted_at=3), None), 0)
    load.note(C, state("other:5000", Lease("n3~k", "t", 30)), 0)
    assert load.elsewhere(A, "r:5000", now=5) == Elsewhere(1, 0, {"n1": 3})  # B's; not A's own or C's
    assert load.elsewhere(B, "r:5000", now=5) == Elsewhere(2, 0, {"n1": 1, "n2": 2})
    assert load.elsewhere(B, "r:5000", now=20) == Elsewhere(1, 0, {"n2": 2})  # A's first lease expired
    assert load.elsewhere(A, "r:5000", now=40) == Elsewhere(0, 1, {})  # B is fetched, nothing coming
    assert load.neighbours(A, "r:5000") == [B]
    load.note(B, state("r:5000", published=2), 1)  # every chunk of B published: forgotten
    assert load.elsewhere(A, "r:5000", now=5) == Elsewhere() and load.neighbours(A, "r:5000") == []


def test_a_blob_nobody_wrote_for_a_while_is_not_being_fetched() -> None:
    load = RegistryLoad()
    load.note(A, state("r:5000", None), 0)
    assert load.elsewhere(B, "r:5000", now=1).idle == 1
    assert load.elsewhere(B, "r:5000", now=ACTIVE_SECONDS).idle == 0
