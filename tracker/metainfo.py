"""Checks on the chunk metainfo an origin publishes, before any peer is handed it, and the BEP 52
merkle root that ties a torrent to bytes (what a digest-mismatch report is checked against)."""

from __future__ import annotations

import hashlib
from typing import Any

from common import bencoding
from common.chunks import Chunk
from common.ids import Digest, InfoHash

MIN_PIECE = 16 * 1024
BLOCK = 16 * 1024  # BEP 52: merkle leaves are SHA-256 hashes of 16 KiB blocks
CHUNK_KEY = b"shoal chunk"  # info-dict key holding the chunk index


def check_metainfo(data: bytes, blob: Digest, chunk: Chunk, ca_pem: bytes) -> InfoHash:
    """The torrent's announced info-hash, once the metainfo is one this tracker will serve for
    `chunk` of `blob`:

    canonical bencode; BitTorrent v2 only; private; exactly one file named after the blob with the
    chunk's length; the chunk's index under `shoal chunk` (which makes each chunk's info-hash
    unique even when two chunks hold the same bytes); this tracker's swarm CA as the SSL root
    certificate; piece layers present.
    """
    top = bencoding.decode_canonical(data)
    info = _field(top, b"info", dict)
    if _field(info, b"meta version", int) != 2 or b"pieces" in info:
        raise ValueError("metainfo must be BitTorrent v2 only (meta version 2, no v1 pieces)")
    if info.get(b"private") != 1:
        raise ValueError("metainfo must be private")
    if _field(info, b"ssl-cert", bytes).strip() != ca_pem.strip():
        raise ValueError("metainfo ssl-cert is not this tracker's swarm CA")
    if _field(info, CHUNK_KEY, int) != chunk.index:
        raise ValueError(f"metainfo {CHUNK_KEY.decode()!r} must be the chunk index {chunk.index}")
    name = blob.torrent_name.encode()
    if _field(info, b"name", bytes) != name:
        raise ValueError(f"metainfo name must be {blob.torrent_name}")
    piece_length = _field(info, b"piece length", int)
    if piece_length < MIN_PIECE or piece_length & (piece_length - 1):
        raise ValueError("piece length must be a power of two of at least 16 KiB")
    tree = _field(info, b"file tree", dict)
    if list(tree) != [name]:
        raise ValueError("metainfo must hold exactly one file, named after the blob")
    file = _field(tree[name], b"", dict)
    length = _field(file, b"length", int)
    if length != chunk.length:
        raise ValueError(
            f"metainfo file length {length} is not the size {chunk.length} of chunk {chunk.index}"
        )
    # An empty file has no pieces root (BEP 52), so an empty blob is never published: nodes fetch
    # blobs that small from the registry.
    root = _field(file, b"pieces root", bytes)
    if len(root) != 32:
        raise ValueError("pieces root must be 32 bytes")
    if length > piece_length:
        layer = _field(_field(top, b"piece layers", dict), root, bytes)
        if len(layer) != 32 * -(-length // piece_length):
            raise ValueError("piece layer does not cover the file")
    return InfoHash.from_v2(hashlib.sha256(bencoding.encode(info)).digest())


def pieces_root(metainfo: bytes) -> bytes:
    """The merkle root of the one file of metainfo that `check_metainfo` accepted."""
    info = bencoding.decode(metainfo)[b"info"]
    (file,) = info[b"file tree"].values()
    root: bytes = file[b""][b"pieces root"]
    return root


def merkle_root(leaves: list[bytes]) -> bytes:
    """BEP 52: the root over the file's block hashes, the leaf layer padded with zero hashes to a
    power of two."""
    layer = leaves + [bytes(32)] * ((1 << max(0, len(leaves) - 1).bit_length()) - len(leaves))
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0]


def _field(container: Any, key: bytes, kind: type) -> Any:
    if not isinstance(container, dict) or key not in container:
        raise ValueError(f"metainfo lacks {key.decode(errors='replace')!r}")
    value = container[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"metainfo {key.decode(errors='replace')!r} has the wrong type")
    return value
