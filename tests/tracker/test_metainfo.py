"""The tracker's metainfo checks against torrents libtorrent itself makes."""

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from common import bencoding
from common.certs import new_ca
from common.ids import Digest
from tracker.metainfo import check_metainfo

CA = new_ca("swarm").cert_pem
PIECE = 16 * 1024


def make_torrent(tmp_path: Path, size: int, name: str, *, flags: int = lt.create_torrent.v2_only,
                 private: bool = True, root_cert: bytes = CA) -> tuple[bytes, Digest]:  # fmt: skip
    data = hashlib.sha256(name.encode()).digest() * (size // 32 + 1)
    (tmp_path / name).write_bytes(data[:size])
    digest = Digest(hashlib.sha256(data[:size]).hexdigest())
    creator = lt.create_torrent(lt.list_files(str(tmp_path / name)), PIECE, flags)
    creator.set_priv(private)
    creator.set_root_cert(root_cert.decode())
    lt.set_piece_hashes(creator, str(tmp_path))
    return lt.bencode(creator.generate()), digest


def test_accepts_what_the_peer_makes_and_returns_the_announced_hash(tmp_path: Path) -> None:
    size = 5 * PIECE + 7
    digest_name = "sha256-" + "0" * 64
    metainfo, _ = make_torrent(tmp_path, size, digest_name)
    blob = Digest("0" * 64)
    info_hash = check_metainfo(metainfo, blob, size, CA)
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
        (lambda m: edit(m, lambda t: t[b"info"].update({b"piece length": 3 * PIECE})), "power of two"),
        (lambda m: edit(m, lambda t: t.pop(b"piece layers")), "piece layers"),
        (lambda m: edit(m, lambda t: t.pop(b"info")), "info"),
    ],
)
def test_refuses_bad_metainfo(tmp_path: Path, mutate: Callable[[bytes], bytes], message: str) -> None:
    name = "sha256-" + "0" * 64
    metainfo, _ = make_torrent(tmp_path, 5 * PIECE, name)
    with pytest.raises(ValueError, match=message):
        check_metainfo(mutate(metainfo), Digest("0" * 64), 5 * PIECE, CA)


def test_refuses_wrong_name_size_and_hybrid(tmp_path: Path) -> None:
    name = "sha256-" + "0" * 64
    metainfo, _ = make_torrent(tmp_path, 5 * PIECE, name)
    with pytest.raises(ValueError, match="name"):
        check_metainfo(metainfo, Digest("1" * 64), 5 * PIECE, CA)
    with pytest.raises(ValueError, match="size"):
        check_metainfo(metainfo, Digest("0" * 64), 5 * PIECE + 1, CA)
    hybrid, _ = make_torrent(tmp_path, 5 * PIECE, name, flags=0)
    with pytest.raises(ValueError, match="v2"):
        check_metainfo(hybrid, Digest("0" * 64), 5 * PIECE, CA)
