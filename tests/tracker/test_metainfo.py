"""The tracker's metainfo checks against torrents libtorrent itself makes."""

from collections.abc import Callable
from typing import Any

import libtorrent as lt
import pytest

from common import bencoding
from common.certs import new_ca
from common.ids import Digest
from tests.tracker.torrents import make_metainfo
from tracker.metainfo import check_metainfo

CA = new_ca("swarm").cert_pem
BLOB = Digest("0" * 64)
DATA = bytes(range(256)) * 321  # five pieces and a bit
SIZE = len(DATA)


def test_accepts_what_the_peer_makes_and_returns_the_announced_hash() -> None:
    metainfo = make_metainfo(BLOB, DATA, CA)
    info_hash = check_metainfo(metainfo, BLOB, SIZE, CA)
    assert info_hash.raw == lt.torrent_info(metainfo).info_hashes().v2.to_bytes()[:20]


def edit(metainfo: bytes, change: Callable[[dict[bytes, Any]], None]) -> bytes:
    top = bencoding.decode(metainfo)
    change(top)
    return bencoding.encode(top)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m + b"x", "malformed"),
        (lambda m: edit(m, lambda t: t[b"info"].pop(b"private")), "private"),
        (lambda m: edit(m, lambda t: t[b"info"].update({b"ssl-cert": b"other"})), "swarm CA"),
        (lambda m: edit(m, lambda t: t[b"info"].update({b"meta version": 1})), "v2"),
        (lambda m: edit(m, lambda t: t[b"info"].update({b"pieces": b""})), "v2"),
        (lambda m: edit(m, lambda t: t[b"info"].update({b"piece length": 3 * 16384})), "power of two"),
        (lambda m: edit(m, lambda t: t.pop(b"piece layers")), "piece layers"),
        (lambda m: edit(m, lambda t: t.pop(b"info")), "info"),
    ],
)
def test_refuses_bad_metainfo(mutate: Callable[[bytes], bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_metainfo(mutate(make_metainfo(BLOB, DATA, CA)), BLOB, SIZE, CA)


def test_refuses_wrong_name_size_and_hybrid() -> None:
    metainfo = make_metainfo(BLOB, DATA, CA)
    with pytest.raises(ValueError, match="name"):
        check_metainfo(metainfo, Digest("1" * 64), SIZE, CA)
    with pytest.raises(ValueError, match="size"):
        check_metainfo(metainfo, BLOB, SIZE + 1, CA)
    with pytest.raises(ValueError, match="v2"):
        check_metainfo(make_metainfo(BLOB, DATA, CA, flags=0), BLOB, SIZE, CA)
