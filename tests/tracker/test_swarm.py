"""The chunk lease rules, what a sync reports as new, report verdicts and the peers an announce
names: table-driven, no sockets."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from common.chunks import plan
from tracker.swarm import (
    ACTIVE_JOINER_SECONDS,
    BlobState,
    ChunkState,
    Elsewhere,
    Lease,
    LeaseLost,
    Peer,
    Rules,
    SwarmView,
    Torrent,
    apply_verdicts,
    displaced,
    leased_chunk,
    news,
    next_expiry,
    publish,
    record_progress,
    start,
    to_verify,
    view_swarm,
    visit,
)

MIB = 2**20
LONE_GRACE = 1.0
RULES = Rules(
    lease_seconds=20, chunks_in_flight=2, announce_interval=30, lone_grace=0, registry_in_flight=100
)
GRACE = Rules(
    lease_seconds=20, chunks_in_flight=2, announce_interval=30, lone_grace=LONE_GRACE, registry_in_flight=100
)
ALIVE = SwarmView([], complete=1, incomplete=0)
DEAD = SwarmView([], complete=0, incomplete=0)


def tokens(prefix: str = "t") -> Callable[[], str]:
    """Fresh lease tokens, unique per prefix (the tracker's are random)."""
    counter = itertools.count()
    return lambda: f"{prefix}-{next(counter)}"


def blob(chunks: int = 4) -> BlobState:
    return start(BlobState(), chunks * MIB, MIB)


def join(
    state: BlobState, node: str, now: float, swarm: SwarmView | None = ALIVE, rules: Rules = RULES
) -> tuple[list[int], BlobState]:
    """Indices of the leases `node` holds after its visit."""
    seen, state = visit(state, node, now, rules, swarm, tokens(f"{node}@{now}"))
    return [index for index, _ in seen.leases], state


def holders(state: BlobState) -> dict[int, str]:
    return {i: c.lease.member for i, c in enumerate(state.chunks) if c.lease is not None}


def token(state: BlobState, index: int) -> str:
    lease = state.chunks[index].lease
    assert lease is not None
    return lease.token


def test_start_plans_the_chunks_once() -> None:
    state = start(BlobState(), 3 * MIB + 1, MIB)
    assert (state.size, state.chunk_size, len(state.chunks)) == (3 * MIB + 1, MIB, 4)
    assert state.plan() == plan(3 * MIB + 1, MIB)
    assert start(state, 99 * MIB, 2 * MIB) == state


@pytest.mark.parametrize(
    ("in_flight", "chunks", "at", "leased"),
    [
        (2, 4, [0], [0]),  # one at first: others of a rollout join within LONE_GRACE
        (2, 4, [0, 0.5], [0]),
        (2, 4, [0, LONE_GRACE], [0, 1]),
        (1, 4, [0, LONE_GRACE], [0]),
        (3, 4, [0, 1, 2, 3], [0, 1, 2]),
        (5, 3, [0, 1, 2, 3], [0, 1, 2]),
    ],
)
def test_a_lone_joiner_takes_one_more_chunk_each_grace_up_to_chunks_in_flight(
    in_flight: int, chunks: int, at: list[float], leased: list[int]
) -> None:
    rules, state = Rules(20, in_flight, 30, LONE_GRACE, 100), blob(chunks)
    for now in at:
        held, state = join(state, "a", now=now, rules=rules)
    assert held == leased


def test_two_active_joiners_get_one_each_lowest_first_and_a_third_waits() -> None:
    _, state = join(blob(), "b", now=0, rules=Rules(20, 0 + 1, 30, 0, 100))  # b active, holding chunk 0
    state = publish(state, 0, token(state, 0), b"meta", "00" * 20, now=1)  # ...and done with it
    held_a, state = join(state, "a", now=2)
    assert held_a == [1]  # not [1, 2]: b is active and holds nothing
    held_b, state = join(state, "b", now=3)
    assert held_b == [2]
    held_c, state = join(state, "c", now=4)
    assert held_c == [] and holders(state) == {1: "a", 2: "b"}  # two in flight already


def test_a_second_lease_once_other_joiners_hold_one_or_went_quiet() -> None:
    _, state = join(blob(), "a", now=0)
    assert holders(state) == {0: "a", 1: "a"}
    state = publish(state, 0, token(state, 0), b"meta", "00" * 20, now=1)
    _, state = join(state, "b", now=2)  # b takes the free slot
    assert holders(state) == {1: "a", 2: "b"}
    state = publish(state, 1, token(state, 1), b"meta", "11" * 20, now=3)
    held, state = join(state, "a", now=4)
    assert held == [3]  # b holds one, so a may hold one again


def test_an_inactive_joiner_does_not_hold_back_a_second_lease() -> None:
    _, state = join(blob(), "b", now=0, rules=Rules(20, 1, 30, 0, 100))
    state = publish(state, 0, token(state, 0), b"meta", "00" * 20, now=1)
    held, _ = join(state, "a", now=2)
    assert held == [1]
    held, _ = join(state, "a", now=1 + ACTIVE_JOINER_SECONDS)
    assert held == [1, 2]


def test_the_first_of_many_joiners_takes_one_chunk_not_all() -> None:
    rules = Rules(20, 4, 30, LONE_GRACE, 100)
    _, state = join(blob(), "a", now=0, rules=rules)
    for node, now in [("b", 0.2), ("c", 0.4), ("a", 0.6), ("d", 0.8)]:
        _, state = join(state, node, now=now, rules=rules)
    assert holders(state) == {0: "a", 1: "b", 2: "c", 3: "d"}


def test_a_long_poll_re_decides_when_a_grace_ends() -> None:
    _, state = join(blob(), "a", now=0, rules=GRACE)
    assert next_expiry(state, now=0.5, rules=GRACE) == LONE_GRACE
    assert next_expiry(state, now=LONE_GRACE, rules=GRACE) == 20  # over: the lease's expiry


def test_expiry_frees_a_chunk_for_another_joiner() -> None:
    _, state = join(blob(2), "a", now=0)
    assert holders(state) == {0: "a", 1: "a"}
    held, state = join(state, "b", now=19.9)
    assert held == []
    held, state = join(state, "b", now=20)  # origin_lease passed without progress
    assert held == [0] and holders(state) == {0: "b"}
    assert next_expiry(state, now=20, rules=RULES) == 40


def test_a_barred_node_never_gets_that_chunk_whatever_key_it_joins_with() -> None:
    state = blob(2)
    state = BlobState(state.size, state.chunk_size, (ChunkState(barred=frozenset({"a"})), ChunkState()))
    held, state = join(state, "a~key-1", now=0)
    assert held == [1]
    held, state = join(state, "a~key-2", now=1)
    assert held == []
    held, state = join(state, "b~key-1", now=2)
    assert held == [0]


@pytest.mark.parametrize(
    ("second", "leases"),
    [
        ("node-1~key-a", [0]),  # the same key again: the same member
        ("node-1~key-b", []),  # the node id of the first, another key
        ("node-2~key-a", []),  # the first's key under another node id: another member
    ],
)
def test_a_lease_belongs_to_the_member_not_the_node_id(second: str, leases: list[int]) -> None:
    held, state = join(blob(1), "node-1~key-a", now=0)
    assert held == [0]
    held, state = join(state, second, now=1)
    assert held == leases
    assert holders(state) == {0: "node-1~key-a"}


def test_progress_extends_a_lease_only_forward() -> None:
    _, state = join(blob(), "a", now=0)
    fetched, moved = record_progress(state, token(state, 0), 10, now=10, lease_seconds=20)
    assert not fetched and moved.chunks[0].lease == Lease("a", token(state, 0), 30, 10)
    assert record_progress(moved, token(state, 0), 10, now=25, lease_seconds=20) == (False, moved)
    with pytest.raises(LeaseLost):
        record_progress(moved, token(state, 0), 20, now=30, lease_seconds=20)
    with pytest.raises(LeaseLost):
        record_progress(moved, "not-a-token", 20, now=1, lease_seconds=20)


@pytest.mark.parametrize(
    ("reported", "fetched", "next_joiner_leases"),
    [(MIB - 1, False, []), (MIB, True, [2]), (5 * MIB, True, [2])],  # past the end: the chunk's end
)
def test_a_chunk_whose_bytes_all_arrived_frees_its_registry_slot(
    reported: int, fetched: bool, next_joiner_leases: list[int]
) -> None:
    _, state = join(blob(), "a", now=0)  # chunks 0 and 1: both registry slots
    done, state = record_progress(state, token(state, 0), reported, now=1, lease_seconds=20)
    assert done is fetched and holders(state)[0] == "a"  # the lease stays until the chunk is published
    held, state = join(state, "b", now=2)
    assert held == next_joiner_leases


def test_publish_needs_the_live_lease_of_that_chunk_and_frees_it() -> None:
    _, state = join(blob(), "a", now=0)
    for index, tok, now in [(1, token(state, 0), 1), (0, "wrong", 1), (0, token(state, 0), 20), (9, "t", 1)]:
        with pytest.raises(LeaseLost):
            publish(state, index, tok, b"meta", "ab" * 20, now)
    assert leased_chunk(state, 0, token(state, 0), 1) == plan(4 * MIB, MIB)[0]
    published = publish(state, 0, token(state, 0), b"meta", "ab" * 20, now=1)
    assert published.chunks[0] == ChunkState(torrent=Torrent(b"meta", "ab" * 20, "a", 1))
    held, _ = join(published, "a", now=2)
    assert held == [1, 2]  # the freed slot goes to the next chunk


def test_a_dead_swarm_unpublishes_chunks_older_than_an_interval() -> None:
    _, state = join(blob(2), "a", now=0)
    state = publish(state, 0, token(state, 0), b"m0", "00" * 20, now=1)
    state = publish(state, 1, token(state, 1), b"m1", "11" * 20, now=19)
    barred = state.chunks[0].barred | {"x"}
    state = BlobState(state.size, state.chunk_size, (ChunkState(state.chunks[0].torrent, barred=barred),
                      state.chunks[1]), state.joiners)  # fmt: skip
    seen, alive = visit(state, "b", 40, RULES, ALIVE, tokens())
    assert seen.reset == [] and len(alive.published()) == 2
    seen, unknown = visit(state, "b", 40, RULES, None, tokens())  # a re-check: liveness not looked at
    assert seen.reset == [] and len(unknown.published()) == 2
    seen, reset = visit(state, "b", 40, RULES, DEAD, tokens())
    assert seen.reset == [0] and [i for i, _ in reset.published()] == [1]  # chunk 1 is too young
    assert reset.chunks[0].barred == barred and seen.granted == [0]


@pytest.mark.parametrize(
    ("known", "fresh", "withdrawn"),
    [
        ([], [0, 2], []),
        (["00" * 20], [2], []),
        (["00" * 20, "22" * 20], [], []),
        (["00" * 20, "11" * 20], [2], ["11" * 20]),
        (["ff" * 20], [0, 2], ["ff" * 20]),
    ],
)
def test_news_is_what_the_node_lacks_and_what_it_has_that_went(
    known: list[str], fresh: list[int], withdrawn: list[str]
) -> None:
    state = BlobState(3 * MIB, MIB, (
        ChunkState(torrent=Torrent(b"m0", "00" * 20, "a", 1)),
        ChunkState(),
        ChunkState(torrent=Torrent(b"m2", "22" * 20, "b", 1)),
    ))  # fmt: skip
    assert news(state, known) == (fresh, withdrawn)


def test_verdicts_withdraw_and_bar_or_mark_verified() -> None:
    state = BlobState(3 * MIB, MIB, (
        ChunkState(torrent=Torrent(b"m0", "00" * 20, "liar~key-1", 1)),
        ChunkState(torrent=Torrent(b"m1", "11" * 20, "honest~key-2", 1)),
        ChunkState(torrent=Torrent(b"m2", "22" * 20, "late~key-3", 1)),
    ))  # fmt: skip
    assert [i for i, _ in to_verify(state)] == [0, 1, 2]
    verdicts = {0: ("00" * 20, False), 1: ("11" * 20, True), 2: ("99" * 20, False)}  # 2: re-published since
    withdrawn, state = apply_verdicts(state, verdicts)
    assert withdrawn == [0]
    assert state.chunks[0] == ChunkState(barred=frozenset({"liar"}))
    assert state.chunks[1].verified and state.chunks[2].torrent is not None
    assert [i for i, _ in to_verify(state)] == [2]
    held, _ = join(state, "liar~key-4", now=2)  # joined again, with a new key
    assert held == []
    held, _ = join(state, "other~key-5", now=2)
    assert held == [0]


def test_last_seen_is_written_at_most_every_few_seconds() -> None:
    _, state = join(blob(1), "a", now=0)
    _, again = join(state, "a", now=1)
    assert again == state  # nothing new: nothing for the store to write
    _, later = join(state, "a", now=10)
    assert later.joiners == {"a": 10}


def test_state_round_trips_through_json() -> None:
    _, state = join(blob(), "a", now=0)
    state = publish(state, 0, token(state, 0), b"\x00meta", "ab" * 20, now=1)
    state = BlobState(state.size, state.chunk_size,
                      (*state.chunks[:3], ChunkState(verified=True, barred=frozenset({"x", "y"}))),
                      state.joiners)  # fmt: skip
    _, state = join(state, "b", now=2)
    assert BlobState.from_json(state.to_json()) == state
    assert BlobState.from_json(None) == BlobState()
    assert BlobState.from_json('{"size": 5, "torrent": null, "lease": null}') == BlobState()  # pre-chunks


def test_a_lease_stored_before_members_is_dropped() -> None:
    _, state = join(blob(1), "a~key", now=0)
    stored = state.to_json().replace('"member": "a~key"', '"node": "a"')
    assert BlobState.from_json(stored).chunks == (ChunkState(),)


def peer(
    member: str, seeding: bool = False, expires_at: float = 100, ip: str = "10.0.0.1", port: int = 6881,
    uploaded: int = 0,
) -> Peer:  # fmt: skip
    return Peer(member, ip, port, seeding, expires_at, uploaded)


def test_view_leaves_out_asker_expired_and_seeders_for_seeders() -> None:
    peers = [peer("a"), peer("b", seeding=True), peer("c", expires_at=5), peer("d", seeding=True)]
    leech = view_swarm(peers, "a", seeding=False, numwant=50, now=10)
    assert {p.member for p in leech.peers} == {"b", "d"}
    assert (leech.complete, leech.incomplete) == (2, 1)
    seed = view_swarm(peers, "b", seeding=True, numwant=50, now=10)
    assert {p.member for p in seed.peers} == {"a"}
    assert len(view_swarm(peers, "x", seeding=False, numwant=1, now=10).peers) == 1


SERVING = [peer("idle-1"), peer("idle-2"), peer("uploader", uploaded=1), peer("seeder", seeding=True)]


@pytest.mark.parametrize(
    ("seeding", "numwant", "named"),
    [
        (False, 1, [{"seeder"}]),
        (False, 2, [{"seeder", "uploader"}]),
        (False, 3, [{"seeder", "uploader", "idle-1"}, {"seeder", "uploader", "idle-2"}]),
        (True, 1, [{"uploader"}]),  # no seeders to a seeder
        (True, 2, [{"uploader", "idle-1"}, {"uploader", "idle-2"}]),
    ],
)
def test_view_names_seeders_then_uploaders_then_the_rest(
    seeding: bool, numwant: int, named: list[set[str]]
) -> None:
    for _ in range(20):  # random within a rank
        view = view_swarm(SERVING, "asker", seeding, numwant, now=10)
        assert {p.member for p in view.peers} in named


X, Y = "10.0.0.1", "10.0.0.2"
AT_X = [peer("x1", ip=X, port=1, expires_at=10), peer("x2", ip=X, port=2, expires_at=20),
        peer("x3", ip=X, port=3, expires_at=30), peer("y1", ip=Y, port=1, expires_at=5)]  # fmt: skip


@pytest.mark.parametrize(
    ("newest", "per_address", "gone"),
    [
        (peer("n", ip=X, port=4, expires_at=40), 4, []),
        (peer("n", ip=X, port=4, expires_at=40), 2, ["x2", "x1"]),  # the latest announces stay
        (peer("n", ip=X, port=4, expires_at=40), 1, ["x3", "x2", "x1"]),
        (peer("n", ip=X, port=2, expires_at=40), 4, ["x2"]),  # the same listener joined again
        (peer("x3", ip=X, port=3, expires_at=40), 2, ["x1"]),  # announcing again keeps its place
        (peer("n", ip=Y, port=2, expires_at=40), 1, ["y1"]),
        (peer("n", ip="10.0.0.3", port=1, expires_at=40), 1, []),  # other addresses are never touched
    ],
)
def test_one_address_fills_at_most_per_address_places(
    newest: Peer, per_address: int, gone: list[str]
) -> None:
    assert displaced(AT_X, newest, per_address) == gone


@pytest.mark.parametrize(
    ("elsewhere", "grace", "leased"),
    [
        (Elsewhere(), 0, [0]),  # b waits with nothing: one for a
        (Elsewhere(fetching=5), 0, [0]),
        (Elsewhere(fetching=6), 0, []),  # registry_in_flight reached
        (Elsewhere(fetching=5, idle=3), 0, [0]),  # the first one is never held back by other blobs
        (Elsewhere(fetching=1, nodes={"a": 0.0}), LONE_GRACE, []),  # a fetches elsewhere: lone_grace
        (Elsewhere(fetching=1, nodes={"a": -5.0}), LONE_GRACE, [0]),  # ... over: one, though b waits
        (Elsewhere(fetching=2, nodes={"a": -5.0, "b": -5.0}), 0, [0, 1]),  # b fetches elsewhere: not waiting
        (Elsewhere(fetching=3, idle=2, nodes={"b": -5.0}), 0, [0]),  # a slot left for each idle blob
    ],
)
def test_the_registrys_other_blobs_limit_what_a_blob_may_fetch(
    elsewhere: Elsewhere, grace: float, leased: list[int]
) -> None:
    rules = Rules(20, 2, 30, grace, registry_in_flight=6)
    _, state = visit(blob(), "b", -1, rules, ALIVE, tokens(), Elsewhere(fetching=6))  # b: active, none
    seen, _ = visit(state, "a", 0, rules, ALIVE, tokens(), elsewhere)
    assert [index for index, _ in seen.leases] == leased
