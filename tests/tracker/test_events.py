"""The tracker's in-process view of how busy each registry is."""

from __future__ import annotations

from common.ids import Digest
from tracker.events import RegistryLoad

A, B, C = (Digest(c * 64) for c in "abc")


def test_a_registrys_load_counts_the_other_blobs_live_fetching_leases() -> None:
    load = RegistryLoad()
    load.note(A, "r:5000", [10.0, 30.0])
    load.note(B, "r:5000", [30.0])
    load.note(C, "other:5000", [30.0])
    assert load.elsewhere(A, "r:5000", now=5) == 1  # B's; A's own and the other registry's do not count
    assert load.elsewhere(B, "r:5000", now=5) == 2
    assert load.elsewhere(B, "r:5000", now=20) == 1  # A's first lease expired
    assert load.neighbours(A, "r:5000") == [B]
    load.note(B, "r:5000", [])  # B fetches nothing any more: forgotten
    assert load.elsewhere(A, "r:5000", now=5) == 0 and load.neighbours(A, "r:5000") == []
    load.note(A, None, [1.0])  # a blob from before states named their registry: not counted
    assert load.elsewhere(B, None, now=0) == 0
