"""Chunk metainfo as a node makes it, with libtorrent itself, for tracker tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import libtorrent as lt

from common import bencoding
from common.ids import Digest

PIECE = 16 * 1024


def make_metainfo(
    blob: Digest,
    data: bytes,
    root_cert: bytes,
    index: int,
    *,
    flags: int = lt.create_torrent.v2_only,
    private: bool = True,
    piece: int = PIECE,
) -> bytes:
    """The torrent of chunk `index` of `blob`, holding `data` (the chunk's bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / blob.torrent_name
        path.write_bytes(data)
        creator = lt.create_torrent(lt.list_files(str(path)), piece, flags)
        creator.set_priv(private)
        creator.set_creation_date(0)
        creator.set_root_cert(root_cert.decode())
        lt.set_piece_hashes(creator, tmp)
        entry = creator.generate()
    entry[b"info"][b"shoal chunk"] = index
    metainfo = bytes(lt.bencode(entry))
    bencoding.decode_canonical(metainfo)  # what the tracker insists on: libtorrent sorts keys
    return metainfo
