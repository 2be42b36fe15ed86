"""BitTorrent v2 SSL metainfo for one blob: pure functions, deterministic output.

The same blob, CA and piece size always give the same bytes (no creation date, no creator), so
two origins that publish the same blob publish the same torrent and info-hash.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import libtorrent as lt

from common.ids import Digest, InfoHash

# tests/bench/peer.py, 4 peers over 200 Mbit/s and 1 Gbit/s links: 256 KiB did as well as 1 and
# 4 MiB (within run-to-run noise) and 64 KiB cost more CPU; smaller pieces give a swarm more to
# trade. Bigger blobs get bigger pieces so the piece count (bitfields, requests) stays near
# MAX_PIECES.
MIN_PIECE_SIZE = 256 * 1024
MAX_PIECE_SIZE = 4 * 1024 * 1024
MAX_PIECES = 4096


def piece_size_for(blob_size: int) -> int:
    """The piece size for a blob: a power of two from 256 KiB to 4 MiB."""
    size = MIN_PIECE_SIZE
    while size < MAX_PIECE_SIZE and blob_size > size * MAX_PIECES:
        size *= 2
    return size


def make_metainfo(blob: Path, digest: Digest, ca_pem: bytes, piece_size: int) -> bytes:
    """Hash `blob` (blocking: call it in a thread) into a private v2 SSL torrent named for it.

    The name is `digest.torrent_name`, which the tracker's peer certificates carry as their DNS
    SAN: libtorrent admits only peers whose certificate names the torrent (see DESIGN.md).
    """
    name = digest.torrent_name
    entry = lt.create_file_entry(name, blob.stat().st_size)
    creator = lt.create_torrent([entry], piece_size, lt.create_torrent.v2_only)
    creator.set_priv(True)
    creator.set_creation_date(0)  # 0 leaves the key out: the output depends on the inputs only
    creator.set_root_cert(ca_pem.decode())
    with tempfile.TemporaryDirectory(prefix="shoal-hash-") as parent:
        # set_piece_hashes reads <parent>/<name>; a symlink gives the blob that name.
        (Path(parent) / name).symlink_to(blob.resolve())
        lt.set_piece_hashes(creator, parent)
    return bytes(lt.bencode(creator.generate()))


def info_hash(metainfo: bytes) -> InfoHash:
    """The truncated v2 info-hash the torrent announces with (BEP 52)."""
    info = lt.torrent_info(metainfo).info_hashes().v2.to_bytes()
    return InfoHash.from_v2(info)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (blocking: call it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as blob:
        while chunk := blob.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
