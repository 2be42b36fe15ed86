"""The role rules, table-driven, without sockets."""

import pytest

from tracker.swarm import (
    WAIT_RETRY_SECONDS,
    BlobState,
    Lease,
    LeaseLost,
    Peer,
    Role,
    decide_join,
    publish,
    record_progress,
    view_swarm,
    withdraw,
)

LEASE = 60.0


def join(state: BlobState, node: str, now: float, token: str = "t-new") -> tuple[Role, BlobState]:
    decision, new = decide_join(state, node, 1000, token, now, LEASE)
    return decision.role, new


def test_first_joiner_is_origin_and_others_wait() -> None:
    role, state = join(BlobState(), "a", now=0)
    assert role is Role.ORIGIN
    assert state.lease == Lease("a", "t-new", LEASE)
    assert state.size == 1000
    decision, _ = decide_join(state, "b", 1000, "t", 1, LEASE)
    assert decision.role is Role.WAIT and decision.origin_bytes == 0
    role_a, again = join(state, "a", now=2, token="other")
    assert role_a is Role.ORIGIN and again.lease is not None and again.lease.token == "t-new"


def test_a_waiter_asks_again_within_a_second_or_when_the_lease_ends() -> None:
    _, state = join(BlobState(), "a", now=0)
    decision, _ = decide_join(state, "b", 1000, "t", 59.5, LEASE)
    assert decision.retry_after == pytest.approx(0.5)
    decision, _ = decide_join(state, "b", 1000, "t", 1.0, LEASE)
    assert decision.retry_after == WAIT_RETRY_SECONDS == 1.0


def test_progress_extends_lease_only_when_moving() -> None:
    _, state = join(BlobState(), "a", now=0)
    moved = record_progress(state, "t-new", 10, now=30, lease_seconds=LEASE)
    assert moved.lease is not None and moved.lease.expires_at == 90
    stuck = record_progress(moved, "t-new", 10, now=80, lease_seconds=LEASE)
    assert stuck == moved
    role, promoted = join(stuck, "b", now=91, token="t-b")
    assert role is Role.ORIGIN and promoted.lease is not None and promoted.lease.node == "b"
    with pytest.raises(LeaseLost):
        record_progress(promoted, "t-new", 20, now=92, lease_seconds=LEASE)


def test_publish_needs_the_live_lease_then_everyone_leeches() -> None:
    _, state = join(BlobState(), "a", now=0)
    with pytest.raises(LeaseLost):
        publish(state, "wrong", b"meta", "ab" * 20, now=1)
    with pytest.raises(LeaseLost):
        publish(state, "t-new", b"meta", "ab" * 20, now=LEASE + 1)
    published = publish(state, "t-new", b"meta", "ab" * 20, now=1)
    assert published.publisher == "a" and published.lease is None
    assert join(published, "b", now=2)[0] is Role.LEECHER
    assert join(published, "a", now=2)[0] is Role.LEECHER


def test_withdraw_bars_publisher_and_next_joiner_is_origin() -> None:
    _, state = join(BlobState(), "a", now=0)
    state = withdraw(publish(state, "t-new", b"meta", "ab" * 20, now=1))
    assert state.torrent is None and state.barred == {"a"}
    barred, _ = decide_join(state, "a", 1000, "t", 2, LEASE)
    assert barred.role is Role.WAIT and barred.origin_bytes is None
    role, state = join(state, "b", now=2)
    assert role is Role.ORIGIN and state.lease is not None and state.lease.node == "b"


def test_state_round_trips_through_json() -> None:
    _, state = join(BlobState(), "a", now=0)
    state = withdraw(publish(state, "t-new", b"\x00meta", "ab" * 20, now=1))
    _, state = join(state, "b", now=2)
    assert BlobState.from_json(state.to_json()) == state
    assert BlobState.from_json(None) == BlobState()


def peer(node: str, seeding: bool = False, expires_at: float = 100) -> Peer:
    return Peer(node, "10.0.0.1", 6881, seeding, expires_at)


def test_view_leaves_out_asker_expired_and_seeders_for_seeders() -> None:
    peers = [peer("a"), peer("b", seeding=True), peer("c", expires_at=5), peer("d", seeding=True)]
    leech = view_swarm(peers, "a", seeding=False, numwant=50, now=10)
    assert {p.node for p in leech.peers} == {"b", "d"}
    assert (leech.complete, leech.incomplete) == (2, 1)
    seed = view_swarm(peers, "b", seeding=True, numwant=50, now=10)
    assert {p.node for p in seed.peers} == {"a"}
    assert len(view_swarm(peers, "x", seeding=False, numwant=1, now=10).peers) == 1
