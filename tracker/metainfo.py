"""Checks on the metainfo an origin publishes, before any peer is handed it (BEP 52)."""

from __future__ import annotations

import hashlib
from typing import Any

from common import bencoding
from common.ids import Digest, InfoHash

MIN_PIECE = 16 * 1024


def check_metainfo(data: bytes, blob: Digest, size: int | None, ca_pem: bytes) -> InfoHash:
    """The torrent's announced info-hash, once the metainfo is one this tracker will serve:

    canonical bencode; BitTorrent v2 only; private; exactly one file named after the blob with
    the blob's size; this tracker's swarm CA as the SSL root certificate; piece layers present.
    """
    top = bencoding.decode_canonical(data)
    info = _field(top, b"info", dict)
    if _field(info, b"meta version", int) != 2 or b"pieces" in info:
        raise ValueError("metainfo must be BitTorrent v2 only (meta version 2, no v1 pieces)")
    if info.get(b"private") != 1:
        raise ValueError("metainfo must be private")
    if _field(info, b"ssl-cert", bytes).strip() != ca_pem.strip():
        raise ValueError("metainfo ssl-cert is not this tracker's swarm CA")
    name = blob.torrent_name.encode()
    if _field(info, b"name", bytes) != name:
        raise ValueError(f"metainfo name must be {blob.torrent_name}")
    piece_length = _field(info, b"piece length", int)
    if piece_length < MIN_PIECE or piece_length & (piece_length - 1):
        raise ValueError("piece length must be a power of two of at least 16 KiB")
    tree = _field(info, b"file tree", dict)
    if list(tree) != [name]:
        raise ValueError("metainfo must hold exactly one file, named after the blob")
    entry = _field(_field(tree[name], b"", dict), b"length", int)
    if size is not None and entry != size:
        raise ValueError(f"metainfo file length {entry} is not the blob's size {size}")
    _check_piece_layers(top, tree[name][b""], entry, piece_length)
    return InfoHash.from_v2(hashlib.sha256(bencoding.encode(info)).digest())


def _check_piece_layers(top: dict[bytes, Any], file: dict[bytes, Any], length: int, piece: int) -> None:
    if length <= piece:
        return
    root = _field(file, b"pieces root", bytes)
    layer = _field(_field(top, b"piece layers", dict), root, bytes)
    if len(layer) != 32 * -(-length // piece):
        raise ValueError("piece layer does not cover the file")


def _field(container: Any, key: bytes, kind: type) -> Any:
    if not isinstance(container, dict) or key not in container:
        raise ValueError(f"metainfo lacks {key.decode(errors='replace')!r}")
    value = container[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"metainfo {key.decode(errors='replace')!r} has the wrong type")
    return value
