"""The BitTorrent side of the tracker as pure functions: parse announces, sign keys, encode replies.

Query strings carry raw 20-byte values (BEP 3), so they are parsed as bytes, never as UTF-8.
Responses use compact peer lists: `peers` for IPv4 (BEP 23), `peers6` for IPv6 (BEP 7).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from common import bencoding
from common.ids import InfoHash, NodeId
from tracker.swarm import Member, SwarmView

KEY_PARAM = "shoal_key"  # BEP 3 already has a `key` parameter, chosen by the client
DEFAULT_NUMWANT = 50
MAX_NUMWANT = 200
EVENTS = ("", "started", "completed", "stopped", "paused")


@dataclass(frozen=True)
class AnnounceRequest:
    info_hash: InfoHash
    port: int
    left: int
    uploaded: int
    event: str
    numwant: int
    key: str


def parse_query(query: str) -> dict[str, list[bytes]]:
    params: dict[str, list[bytes]] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        key = unquote_to_bytes(name.replace("+", " ")).decode("ascii", "replace")
        params.setdefault(key, []).append(unquote_to_bytes(value.replace("+", " ")))
    return params


def parse_announce(query: str) -> AnnounceRequest:
    params = parse_query(query)
    info_hash = InfoHash.parse(_one(params, "info_hash"))
    port = _integer(params, "port", None)
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1-65535")
    event = _one(params, "event", b"").decode("ascii", "replace")
    if event not in EVENTS:
        raise ValueError(f"unknown event {event[:20]!r}")
    numwant = min(max(_integer(params, "numwant", DEFAULT_NUMWANT), 0), MAX_NUMWANT)
    return AnnounceRequest(
        info_hash=info_hash,
        port=port,
        left=_integer(params, "left", None),
        uploaded=_integer(params, "uploaded", 0),
        event=event,
        numwant=numwant,
        key=_one(params, KEY_PARAM, b"").decode("ascii", "replace"),
    )


def parse_scrape(query: str) -> tuple[list[InfoHash], str]:
    params = parse_query(query)
    hashes = [InfoHash.parse(raw) for raw in params.get("info_hash", [])]
    return hashes, _one(params, KEY_PARAM, b"").decode("ascii", "replace")


def _one(params: dict[str, list[bytes]], name: str, default: bytes | None = None) -> bytes:
    values = params.get(name)
    if not values:
        if default is None:
            raise ValueError(f"missing {name}")
        return default
    if len(values) > 1:
        raise ValueError(f"{name} given more than once")
    return values[0]


def _integer(params: dict[str, list[bytes]], name: str, default: int | None) -> int:
    raw = _one(params, name, None if default is None else str(default).encode())
    if not raw.isdigit() or len(raw) > 19:
        raise ValueError(f"{name} must be a non-negative integer")
    return int(raw)


class AnnounceKeys:
    """Keys that bind an announce to one member (node id and joining key), one info-hash and an
    expiry, signed by HMAC.

    Format `<node>~<key id>~<info-hash hex>~<expiry>~<mac>`: "~" never occurs in node ids or hex.
    """

    def __init__(self, secret: bytes):
        self._secret = secret

    def sign(self, member: Member, info_hash: InfoHash, expires_at: int) -> str:
        payload = f"{member}~{info_hash.hex}~{expires_at}"
        return f"{payload}~{self._mac(payload)}"

    def verify(self, key: str, info_hash: InfoHash, now: float) -> Member:
        payload, _, mac = key.rpartition("~")
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            raise ValueError("announce key signature invalid")
        parts = payload.split("~")
        if len(parts) == 3:
            # Signed before members: `<node>~<hash>~<expiry>`. It stays valid until it expires
            # (`peer_cert_ttl`), so that nodes seeding from their cache keep announcing across a
            # tracker upgrade, as the member "<node>~", which no join makes.
            parts.insert(1, "")
        node, key_id, hash_hex, expires_at = parts
        if hash_hex != info_hash.hex:
            raise ValueError("announce key is for another torrent")
        if int(expires_at) <= now:
            raise ValueError("announce key expired")
        return Member(NodeId.parse(node), key_id)

    def _mac(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()[:32]


def encode_peers(view: SwarmView, interval: int) -> bytes:
    v4, v6 = bytearray(), bytearray()
    for peer in view.peers:
        address = ipaddress.ip_address(peer.ip)
        target = v4 if address.version == 4 else v6
        target += address.packed + struct.pack("!H", peer.port)
    return bencoding.encode(
        {
            b"interval": interval,
            b"min interval": max(1, interval // 2),
            b"complete": view.complete,
            b"incomplete": view.incomplete,
            b"peers": bytes(v4),
            b"peers6": bytes(v6),
        }
    )


def encode_scrape(counts: dict[InfoHash, SwarmView]) -> bytes:
    files = {
        ih.raw: {b"complete": v.complete, b"incomplete": v.incomplete, b"downloaded": 0}
        for ih, v in counts.items()
    }
    return bencoding.encode({b"files": files})


def encode_failure(reason: str) -> bytes:
    return bencoding.encode({b"failure reason": reason.encode()})
