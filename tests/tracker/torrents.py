"""Metainfo as an origin makes it, with libtorrent itself, for tracker tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import libtorrent as lt

from common.ids import Digest

PIECE = 16 * 1024


def make_metainfo(
    blob: Digest,
    data: bytes,
    root_cert: bytes,
    *,
    flags: int = lt.create_torrent.v2_only,
    private: bool = True,
) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / blob.torrent_name
        path.write_bytes(data)
        creator = lt.create_torrent(lt.list_files(str(path)), PIECE, flags)
        creator.set_priv(private)
        creator.set_root_cert(root_cert.decode())
        lt.set_piece_hashes(creator, tmp)
        return bytes(lt.bencode(creator.generate()))
