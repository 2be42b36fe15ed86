"""BitTorrent v2 SSL metainfo for one chunk of a blob: pure functions, deterministic output.

The same chunk, index, CA and piece size always give the same bytes (no creation date, no
creator), so two origins that publish the same chunk publish the same torrent and info-hash.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import libtorrent as lt

from common.ids import Digest

# The info-dict key holding the chunk's index. Every chunk torrent of a blob has the blob's name
# (what peer certificates are scoped to), so without it two chunks with the same bytes would be
# one torrent; the tracker checks it.
CHUNK_KEY = b"shoal chunk"

# tests/bench/peer.py, 4 peers over 200 Mbit/s and 1 Gbit/s links: 256 KiB did as well as 1 and
# 4 MiB (within run-to-run noise) and 64 KiB cost more CPU; smaller pieces give a swarm more to
# trade. Bigger chunks get bigger pieces so the piece count (bitfields, requests) stays near
# MAX_PIECES.
MIN_PIECE_SIZE = 256 * 1024
MAX_PIECE_SIZE = 4 * 1024 * 1024
MAX_PIECES = 4096


def piece_size_for(length: int) -> int:
    """The piece size for a chunk of `length` bytes: a power of two from 256 KiB to 4 MiB."""
    size = MIN_PIECE_SIZE
    while size < MAX_PIECE_SIZE and length > size * MAX_PIECES:
        size *= 2
    return size


def make_chunk_metainfo(path: Path, digest: Digest, index: int, ca_pem: bytes, piece_size: int) -> bytes:
    """Hash chunk `index` of `digest`, the file at `path` (blocking: call it in a thread), into a
    private v2 SSL torrent named for the blob.

    The name is `digest.torrent_name`, which the tracker's peer certificates carry as their DNS
    SAN: libtorrent admits only peers whose certificate names the torrent (see DESIGN.md), so one
    blob-scoped certificate opens every chunk torrent of that blob and no other's.
    """
    name = digest.torrent_name
    entry = lt.create_file_entry(name, path.stat().st_size)
    creator = lt.create_torrent([entry], piece_size, lt.create_torrent.v2_only)
    creator.set_priv(True)
    creator.set_creation_date(0)  # 0 leaves the key out: the output depends on the inputs only
    creator.set_root_cert(ca_pem.decode())
    with tempfile.TemporaryDirectory(prefix="shoal-hash-") as parent:
        # set_piece_hashes reads <parent>/<name>; a symlink gives the chunk file that name.
        (Path(parent) / name).symlink_to(path.resolve())
        lt.set_piece_hashes(creator, parent)
    metainfo = creator.generate()
    metainfo[b"info"][CHUNK_KEY] = index
    # libtorrent's dictionaries are sorted maps: the encoding is canonical, as BEP 3 wants and
    # the tracker insists, so the info-hash is that of the info dict as published.
    return bytes(lt.bencode(metainfo))
