"""Chunk metainfo: deterministic, private, v2-only, SSL-rooted, named for the blob, one per chunk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import libtorrent as lt
import pytest

from common.bencoding import decode_canonical
from common.certs import new_ca
from common.chunks import Chunk
from peer.session import PeerError, load_chunk
from peer.torrent import make_chunk_metainfo, piece_size_for
from tests.peer.swarm import MiB, make_blob

KiB = 1024
GiB = 1024 * MiB


@pytest.mark.parametrize(
    ("length", "piece_size"),
    [
        (0, 256 * KiB),
        (1, 256 * KiB),
        (64 * MiB, 256 * KiB),
        (1 * GiB, 256 * KiB),
        (1 * GiB + 1, 512 * KiB),
        (4 * GiB, 1 * MiB),
        (100 * GiB, 4 * MiB),
    ],
)
def test_piece_size_grows_with_the_chunk(length: int, piece_size: int) -> None:
    assert piece_size_for(length) == piece_size


def test_metainfo_is_deterministic_and_shaped_for_the_swarm(tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 3 * MiB + 5)
    ca = new_ca("swarm")
    first = make_chunk_metainfo(blob.path, blob.digest, 2, ca.cert_pem, 256 * KiB)
    assert make_chunk_metainfo(blob.path, blob.digest, 2, ca.cert_pem, 256 * KiB) == first
    decoded = decode_canonical(first)  # canonical: the tracker hashes the info dict as published
    assert set(decoded) == {b"info", b"piece layers"}  # no creation date, creator or trackers
    info = decoded[b"info"]
    assert info[b"name"] == blob.digest.torrent_name.encode()
    assert info[b"shoal chunk"] == 2
    assert info[b"file tree"][info[b"name"]][b""][b"length"] == blob.size
    assert info[b"private"] == 1
    assert info[b"meta version"] == 2 and b"pieces" not in info  # v2 only
    assert info[b"ssl-cert"] == ca.cert_pem
    assert info[b"piece length"] == 256 * KiB
    announced = lt.torrent_info(first).info_hashes().v2.to_bytes()
    assert announced == hashlib.sha256(lt.bencode(info)).digest()


def test_metainfo_differs_by_chunk_ca_and_piece_size(tmp_path: Path) -> None:
    """Same bytes as chunk 0 and chunk 1: two torrents, two info-hashes."""
    blob = make_blob(tmp_path, MiB)
    ca = new_ca("swarm")
    base = make_chunk_metainfo(blob.path, blob.digest, 0, ca.cert_pem, 256 * KiB)
    others = [
        make_chunk_metainfo(blob.path, blob.digest, 1, ca.cert_pem, 256 * KiB),
        make_chunk_metainfo(blob.path, blob.digest, 0, new_ca("swarm").cert_pem, 256 * KiB),
        make_chunk_metainfo(blob.path, blob.digest, 0, ca.cert_pem, 512 * KiB),
    ]
    hashes = {lt.torrent_info(m).info_hashes().v2.to_bytes() for m in [base, *others]}
    assert len(hashes) == 4


def test_load_chunk_refuses_metainfo_of_another_chunk_or_blob(tmp_path: Path) -> None:
    length = MiB - 12345  # not a whole number of pieces: v2 adds a pad file, which is no file
    blob, other = make_blob(tmp_path, length, seed=1), make_blob(tmp_path, length, seed=2)
    ca = new_ca("swarm")
    metainfo = make_chunk_metainfo(blob.path, blob.digest, 1, ca.cert_pem, 256 * KiB)
    chunk = Chunk(1, MiB, MiB + length)
    torrent = load_chunk(metainfo, blob.digest, chunk)
    assert (torrent.index, torrent.size, torrent.name) == (1, length, blob.digest.torrent_name)
    for digest, wrong in (
        (other.digest, chunk),
        (blob.digest, Chunk(0, 0, length)),
        (blob.digest, Chunk(1, MiB, 3 * MiB)),
    ):
        with pytest.raises(PeerError):
            load_chunk(metainfo, digest, wrong)
    with pytest.raises(PeerError):
        load_chunk(b"not metainfo", blob.digest, chunk)
