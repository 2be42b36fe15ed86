"""Announce and scrape parsing, keys and replies; hypothesis feeds parsers arbitrary input."""

import contextlib
import hashlib
import hmac
import ipaddress
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import bencoding
from common.ids import InfoHash, NodeId
from tracker.announce import (
    AnnounceKeys,
    encode_failure,
    encode_peers,
    parse_announce,
    parse_scrape,
)
from tracker.swarm import Member, Peer, SwarmView

HASH = InfoHash(bytes(range(20)))
KEYS = AnnounceKeys(b"k" * 32)


def query(**params: bytes | str | int) -> str:
    def enc(v: bytes | str | int) -> str:
        return quote_from_bytes(v) if isinstance(v, bytes) else quote_from_bytes(str(v).encode())

    return "&".join(f"{k}={enc(v)}" for k, v in params.items())


def test_parses_a_libtorrent_style_announce() -> None:
    q = query(info_hash=HASH.raw, peer_id=b"-LT2110-\xff\x00abcdefghij", port=6881, uploaded=0,
              downloaded=0, left=1024, event="started", numwant=500, compact=1, key="abc",
              shoal_key="n~x~1~y")  # fmt: skip
    request = parse_announce(q)
    assert request.info_hash == HASH and request.port == 6881 and request.left == 1024
    assert request.event == "started" and request.numwant == 200 and request.key == "n~x~1~y"
    assert request.uploaded == 0 and parse_announce(q.replace("uploaded=0", "uploaded=77")).uploaded == 77


@pytest.mark.parametrize(
    "params",
    [
        {"port": 1, "left": 0},
        {"info_hash": b"short", "port": 1, "left": 0},
        {"info_hash": HASH.raw, "port": 0, "left": 0},
        {"info_hash": HASH.raw, "port": "x", "left": 0},
        {"info_hash": HASH.raw, "port": 1},
        {"info_hash": HASH.raw, "port": 1, "left": -1},
        {"info_hash": HASH.raw, "port": 1, "left": 0, "event": "bogus"},
    ],
)
def test_malformed_announces_are_errors(params: dict[str, bytes | str | int]) -> None:
    with pytest.raises(ValueError):
        parse_announce(query(**params))


@given(st.text())
def test_any_announce_query_parses_or_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_announce(text)


@given(st.binary())
def test_any_scrape_query_parses_or_raises_value_error(raw: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_scrape(quote_from_bytes(raw, safe="=&"))


@given(st.binary())
def test_bencode_decoder_raises_only_value_error(raw: bytes) -> None:
    with contextlib.suppress(ValueError):
        bencoding.decode(raw)


@given(
    st.recursive(
        st.integers() | st.binary(), lambda inner: st.lists(inner) | st.dictionaries(st.binary(), inner)
    )
)
def test_bencode_round_trips(value: object) -> None:
    assert bencoding.decode_canonical(bencoding.encode(value)) == value  # type: ignore[arg-type]


MEMBER = Member(NodeId.parse("node-1"), "ab" * 32)


def test_keys_bind_member_hash_and_expiry() -> None:
    key = KEYS.sign(MEMBER, HASH, expires_at=1000)
    assert KEYS.verify(key, HASH, now=999) == MEMBER
    with pytest.raises(ValueError, match="another torrent"):
        KEYS.verify(key, InfoHash(b"\x01" * 20), now=999)
    with pytest.raises(ValueError, match="expired"):
        KEYS.verify(key, HASH, now=1000)
    for forged in [key.replace("node-1", "node-2"), key.replace("ab" * 32, "cd" * 32)]:
        with pytest.raises(ValueError, match="signature"):
            KEYS.verify(forged, HASH, now=999)
    with pytest.raises(ValueError):
        AnnounceKeys(b"other" * 8).verify(key, HASH, now=999)


def test_a_key_signed_before_members_is_a_member_no_join_makes() -> None:
    payload = f"node-1~{HASH.hex}~1000"  # as trackers signed keys before members
    legacy = f"{payload}~{hmac.new(b'k' * 32, payload.encode(), hashlib.sha256).hexdigest()[:32]}"
    assert KEYS.verify(legacy, HASH, now=999) == Member(NodeId.parse("node-1"), "")
    with pytest.raises(ValueError, match="expired"):
        KEYS.verify(legacy, HASH, now=1000)


@given(st.text())
def test_arbitrary_keys_never_verify(key: str) -> None:
    with pytest.raises(ValueError):
        KEYS.verify(key, HASH, now=0)


def test_compact_peers_v4_and_v6() -> None:
    view = SwarmView([Peer("a", "10.1.2.3", 6881, False, 1), Peer("b", "fd00::1", 7000, True, 1)], 1, 1)
    reply = bencoding.decode(encode_peers(view, 30))
    assert reply[b"peers"] == bytes([10, 1, 2, 3, 0x1A, 0xE1])
    assert reply[b"peers6"] == ipaddress.ip_address("fd00::1").packed + (7000).to_bytes(2, "big")
    assert reply[b"interval"] == 30 and reply[b"complete"] == 1 and reply[b"incomplete"] == 1
    assert bencoding.decode(encode_failure("no")) == {b"failure reason": b"no"}
