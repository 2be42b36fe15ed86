"""Metainfo: deterministic, private, v2-only, SSL-rooted, named for the blob."""

from __future__ import annotations

import hashlib
from pathlib import Path

import libtorrent as lt
import pytest

from common.certs import new_ca
from peer.torrent import info_hash, make_metainfo, piece_size_for, sha256_file
from tests.peer.swarm import MiB, make_blob

KiB = 1024
GiB = 1024 * MiB


@pytest.mark.parametrize(
    ("blob_size", "piece_size"),
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
def test_piece_size_grows_with_the_blob(blob_size: int, piece_size: int) -> None:
    assert piece_size_for(blob_size) == piece_size


def test_metainfo_is_deterministic_and_shaped_for_the_swarm(tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 3 * MiB + 5)
    ca = new_ca("swarm")
    first = make_metainfo(blob.path, blob.digest, ca.cert_pem, 256 * KiB)
    assert make_metainfo(blob.path, blob.digest, ca.cert_pem, 256 * KiB) == first
    decoded = lt.bdecode(first)
    assert set(decoded) == {b"info", b"piece layers"}  # no creation date, creator or trackers
    info = decoded[b"info"]
    assert info[b"name"] == blob.digest.torrent_name.encode()
    assert info[b"private"] == 1
    assert info[b"meta version"] == 2 and b"pieces" not in info  # v2 only
    assert info[b"ssl-cert"] == ca.cert_pem
    assert info[b"piece length"] == 256 * KiB
    assert info_hash(first).raw == hashlib.sha256(lt.bencode(info)).digest()[:20]


def test_metainfo_differs_by_ca_and_piece_size(tmp_path: Path) -> None:
    blob = make_blob(tmp_path, MiB)
    ca = new_ca("swarm")
    base = make_metainfo(blob.path, blob.digest, ca.cert_pem, 256 * KiB)
    assert make_metainfo(blob.path, blob.digest, new_ca("swarm").cert_pem, 256 * KiB) != base
    assert make_metainfo(blob.path, blob.digest, ca.cert_pem, 512 * KiB) != base


def test_sha256_file(tmp_path: Path) -> None:
    blob = make_blob(tmp_path, 3 * MiB)
    assert sha256_file(blob.path) == blob.digest.hex
