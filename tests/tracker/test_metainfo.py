"""The tracker's chunk metainfo checks and BEP 52 merkle roots, against torrents libtorrent itself makes."""

import hashlib
from collections.abc import Callable
from typing import Any

import libtorrent as lt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import bencoding
from common.certs import new_ca
from common.chunks import Chunk, plan
from common.ids import Digest
from tests.tracker.torrents import make_metainfo
from tracker.metainfo import BLOCK, check_metainfo, merkle_root, pieces_root
from tracker.verify import ChunkRoots

CA = new_ca("swarm").cert_pem
BLOB = Digest("0" * 64)
DATA = bytes(range(256)) * 321  # five pieces and a bit
CHUNK = Chunk(3, 3 * 2**20, 3 * 2**20 + len(DATA))  # the last chunk of a blob, shorter than the others


def libtorrent_root(metainfo: bytes) -> bytes:
    return bytes(lt.torrent_info(metainfo).layout().root(0).to_bytes())


def test_accepts_what_the_node_makes_and_returns_the_announced_hash() -> None:
    metainfo = make_metainfo(BLOB, DATA, CA, CHUNK.index)
    info_hash = check_metainfo(metainfo, BLOB, CHUNK, CA)
    assert info_hash.raw == lt.torrent_info(metainfo).info_hashes().v2.to_bytes()[:20]


def test_the_chunk_index_makes_equal_bytes_different_torrents() -> None:
    first, second = (make_metainfo(BLOB, DATA, CA, index) for index in (0, 1))
    assert pieces_root(first) == pieces_root(second)
    assert check_metainfo(first, BLOB, Chunk(0, 0, len(DATA)), CA) != check_metainfo(
        second, BLOB, Chunk(1, 2**20, 2**20 + len(DATA)), CA
    )


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
        (lambda m: edit(m, lambda t: t[b"info"].pop(b"shoal chunk")), "shoal chunk"),
        (lambda m: edit(m, lambda t: t[b"info"].update({b"shoal chunk": 2})), "chunk index 3"),
        (lambda m: edit(m, lambda t: t[b"info"].update({b"shoal chunk": b"3"})), "wrong type"),
    ],
)
def test_refuses_bad_metainfo(mutate: Callable[[bytes], bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_metainfo(mutate(make_metainfo(BLOB, DATA, CA, CHUNK.index)), BLOB, CHUNK, CA)


def test_refuses_wrong_name_length_and_hybrid() -> None:
    metainfo = make_metainfo(BLOB, DATA, CA, CHUNK.index)
    with pytest.raises(ValueError, match="name"):
        check_metainfo(metainfo, Digest("1" * 64), CHUNK, CA)
    with pytest.raises(ValueError, match="size"):
        check_metainfo(metainfo, BLOB, Chunk(CHUNK.index, CHUNK.start, CHUNK.end + 1), CA)
    with pytest.raises(ValueError, match="v2"):
        check_metainfo(make_metainfo(BLOB, DATA, CA, CHUNK.index, flags=0), BLOB, CHUNK, CA)


@given(st.binary() | st.builds(bencoding.encode, st.dictionaries(st.binary(max_size=12), st.integers())))
def test_arbitrary_metainfo_raises_only_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        check_metainfo(data, BLOB, CHUNK, CA)


@pytest.mark.parametrize("size", [1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 7, 300_000, 2**20, 2**20 + 5])
@pytest.mark.parametrize("piece", [BLOCK, 4 * BLOCK, 16 * BLOCK])
def test_merkle_root_is_libtorrents_pieces_root(size: int, piece: int) -> None:
    data = bytes((i * 7 + i // 4099) % 251 for i in range(size))
    metainfo = make_metainfo(BLOB, data, CA, 0, piece=piece)
    leaves = [hashlib.sha256(data[i : i + BLOCK]).digest() for i in range(0, size, BLOCK)]
    assert merkle_root(leaves) == pieces_root(metainfo) == libtorrent_root(metainfo)


def test_streamed_chunk_roots_match_each_chunks_torrent() -> None:
    """The report check: blob bytes from the registry, fed in odd-sized reads from a chunk
    boundary, give each wanted chunk the pieces root of a torrent of that chunk's bytes."""
    chunk_size = 2**20
    blob = bytes((i * 31 + i // 65537) % 253 for i in range(3 * chunk_size + 12_345))
    chunks = plan(len(blob), chunk_size)
    wanted = [chunks[1], chunks[3]]
    roots = ChunkRoots(chunk_size, wanted)
    for offset in range(chunks[1].start, chunks[3].end, 77_777):
        roots.feed(blob[offset : min(offset + 77_777, chunks[3].end)])
    expected = {
        c.index: libtorrent_root(make_metainfo(BLOB, blob[c.start : c.end], CA, c.index, piece=2**18))
        for c in wanted
    }
    assert roots.roots() == expected
