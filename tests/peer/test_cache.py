"""The blob cache: what enters it, how a blob is read back across its chunks, what it evicts,
what survives a restart or a crash."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest

from common.certs import new_ca
from common.chunks import MIN_CHUNK_SIZE, plan
from common.ids import Digest
from peer.cache import BlobCache, DigestMismatch, Entry, choose_evictions
from tests.peer.swarm import Blob, credentials, make_blob

CHUNK = MIN_CHUNK_SIZE


def d(n: int) -> Digest:
    return Digest(f"{n:064x}")


def entries(*specs: tuple[int, int, float]) -> list[Entry]:
    return [Entry(d(n), size, used) for n, size, used in specs]


@pytest.mark.parametrize(
    ("cached", "pinned", "limit", "evicted"),
    [
        ([], set(), 0, []),
        ([(1, 10, 1.0), (2, 10, 2.0)], set(), 20, []),  # exactly full
        ([(1, 10, 1.0), (2, 10, 2.0)], set(), 19, [1]),  # least recently used first
        ([(1, 10, 2.0), (2, 10, 1.0)], set(), 19, [2]),
        ([(1, 10, 1.0), (2, 10, 2.0), (3, 10, 3.0)], set(), 10, [1, 2]),
        ([(1, 10, 1.0), (2, 10, 2.0)], {1}, 19, [2]),  # a pinned blob is skipped
        ([(1, 10, 1.0), (2, 10, 2.0)], {1, 2}, 0, []),  # even past the limit
        ([(1, 5, 1.0), (2, 30, 2.0), (3, 5, 3.0)], set(), 12, [1, 2]),  # stop as soon as it fits
        ([(1, 10, 1.0), (2, 10, 1.0)], set(), 10, [1]),  # ties broken by digest: stable
    ],
)
def test_choose_evictions(
    cached: list[tuple[int, int, float]], pinned: set[int], limit: int, evicted: list[int]
) -> None:
    chosen = choose_evictions(entries(*cached), {d(n) for n in pinned}, limit)
    assert chosen == [d(n) for n in evicted]


def write_chunks(cache: BlobCache, digest: Digest, data: bytes) -> None:
    """As libtorrent and origins do: each chunk in its own file."""
    cache.prepare(digest)
    for chunk in plan(len(data), CHUNK):
        cache.chunk_path(digest, chunk.index).write_bytes(data[chunk.start : chunk.end])


def cache_blob(cache: BlobCache, blob: Blob) -> None:
    write_chunks(cache, blob.digest, blob.data)
    cache.commit(blob.digest, blob.size, CHUNK)


def test_commit_admits_only_chunks_that_make_the_digest(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10**9)
    blob = make_blob(tmp_path, 2 * CHUNK + 1000)
    swapped = blob.data[CHUNK : 2 * CHUNK] + blob.data[:CHUNK] + blob.data[2 * CHUNK :]
    write_chunks(cache, blob.digest, swapped)  # every chunk right in itself, the blob wrong
    with pytest.raises(DigestMismatch):
        cache.commit(blob.digest, blob.size, CHUNK)
    assert blob.digest not in cache
    write_chunks(cache, blob.digest, blob.data[:-1])  # one byte short
    with pytest.raises(DigestMismatch):
        cache.commit(blob.digest, blob.size, CHUNK)
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []  # no marker, no temporary file
    write_chunks(cache, blob.digest, blob.data)
    assert cache.commit(blob.digest, blob.size, CHUNK) == tmp_path / "blobs" / "sha256" / blob.digest.hex
    assert blob.digest in cache
    assert cache.layout(blob.digest) == (blob.size, CHUNK)
    marker = json.loads((tmp_path / "blobs" / "sha256" / blob.digest.hex).read_text())
    assert marker == {"size": blob.size, "chunk_size": CHUNK}


@pytest.mark.parametrize(
    ("start", "end"), [(0, None), (0, 1), (CHUNK - 1, CHUNK + 1), (CHUNK, 2 * CHUNK), (5, 2 * CHUNK + 7)]
)
def test_ranges_read_a_cached_blob_across_its_chunks(tmp_path: Path, start: int, end: int | None) -> None:
    cache = BlobCache(tmp_path, 10**9)
    blob = make_blob(tmp_path, 2 * CHUNK + 1000)
    cache_blob(cache, blob)
    end = blob.size if end is None else end
    read = b""
    for path, offset, length in cache.ranges(blob.digest, start, end):
        with path.open("rb") as file:
            file.seek(offset)
            read += file.read(length)
    assert read == blob.data[start:end]
    with pytest.raises(KeyError):
        cache.ranges(d(1), 0, 1)


def test_restart_discards_what_is_not_a_complete_blob(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10**9)
    complete, partial = make_blob(tmp_path, 1000, seed=1), make_blob(tmp_path, 3000, seed=2)
    cache_blob(cache, complete)
    write_chunks(cache, partial.digest, partial.data[:1000])  # a download cut short by a crash
    blobs = tmp_path / "blobs" / "sha256"
    (blobs / f".{partial.digest.hex}.tmp").write_text("{")  # a marker half written
    (blobs / d(7).hex).write_bytes(os.urandom(2 * CHUNK))  # a whole blob, as an older layout kept it
    (tmp_path / "partial").mkdir()  # older layout
    (tmp_path / "partial" / d(8).hex).write_bytes(b"half")
    (tmp_path / "torrents" / f"{d(7).hex}.key").write_bytes(b"key")
    BlobCache(tmp_path, 10**9)
    assert [path.name for path in blobs.iterdir()] == [complete.digest.hex]
    assert [path.name for path in (tmp_path / "chunks").iterdir()] == [complete.digest.hex]
    assert not (tmp_path / "partial").exists()
    assert not any((tmp_path / "torrents").iterdir())


def test_a_marker_whose_chunks_are_gone_is_not_a_blob(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10**9)
    blob = make_blob(tmp_path, 1000)
    cache_blob(cache, blob)
    for path in (tmp_path / "chunks" / blob.digest.hex).iterdir():
        path.unlink()
    (tmp_path / "chunks" / blob.digest.hex).rmdir()
    assert blob.digest not in BlobCache(tmp_path, 10**9)


def test_eviction_on_disk_spares_pinned_blobs(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 2500)
    blobs = [make_blob(tmp_path, 1000, seed=n) for n in range(3)]
    for age, blob in enumerate(blobs):
        cache_blob(cache, blob)
        os.utime(tmp_path / "blobs" / "sha256" / blob.digest.hex, (1000 + age, 1000 + age))
    with cache.pin(blobs[0].digest):  # the oldest, but being served: marked used, never evicted
        assert cache.to_evict() == [blobs[1].digest]
        for digest in cache.to_evict():
            cache.evict(digest)
        with pytest.raises(RuntimeError):
            cache.evict(blobs[0].digest)
    assert [blob.digest in cache for blob in blobs] == [True, False, True]
    assert not (tmp_path / "chunks" / blobs[1].digest.hex).exists()


def test_a_blob_found_wrong_is_deleted_even_while_it_is_read(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10**9)
    blob = make_blob(tmp_path, 1000)
    cache_blob(cache, blob)
    with cache.pin(blob.digest):
        cache.delete(blob.digest)
        assert blob.digest not in cache
    assert not (tmp_path / "chunks" / blob.digest.hex).exists()


def test_a_full_disk_leaves_no_half_written_marker(small_disk: Path, tmp_path: Path) -> None:
    cache = BlobCache(small_disk, 10**9)
    blob = make_blob(tmp_path, CHUNK + 1000)
    write_chunks(cache, blob.digest, blob.data)
    with (small_disk / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:  # until the disk is full
            filler.write(b"\0" * 4096)
    with pytest.raises(OSError, match="No space left"):
        cache.commit(blob.digest, blob.size, CHUNK)
    assert blob.digest not in cache
    assert list((small_disk / "blobs" / "sha256").iterdir()) == []


def test_discard_deletes_an_incomplete_blob_only(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10**9)
    complete, partial = make_blob(tmp_path, 1000, seed=1), make_blob(tmp_path, 1000, seed=2)
    cache_blob(cache, complete)
    write_chunks(cache, partial.digest, partial.data)
    cache.discard(partial.digest)
    assert not (tmp_path / "chunks" / partial.digest.hex).exists()
    with pytest.raises(RuntimeError):
        cache.discard(complete.digest)
    assert complete.digest in cache


def test_seeding_state_survives_a_restart_until_the_certificate_expires(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10**9)
    ca = new_ca("swarm")
    valid, expired, uncached, torn = (make_blob(tmp_path, CHUNK + 10, seed=n) for n in range(4))
    for blob in (valid, expired, torn):
        cache_blob(cache, blob)
    for blob, lifetime in ((valid, 3600), (expired, -60), (uncached, 3600), (torn, 3600)):
        cache.save_seed(blob.digest, credentials(ca, blob.digest, "node", lifetime))
        for index in (0, 1) if blob is not torn else (0,):  # torn: a chunk torrent never saved
            cache.save_chunk_torrent(blob.digest, index, b"metainfo %d" % index)
    folder = tmp_path / "torrents" / valid.digest.hex
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for secret in ("key", "announce"):  # the announce URL carries the announce key
        assert stat.S_IMODE((folder / secret).stat().st_mode) == 0o600
    records = BlobCache(tmp_path, 10**9).seeds()
    assert [record.digest for record in records] == [valid.digest]
    record = records[0]
    assert (record.size, record.chunk_size) == (valid.size, CHUNK)
    assert record.metainfo == {0: b"metainfo 0", 1: b"metainfo 1"}
    assert record.credentials.announce.startswith("https://")
    assert [path.name for path in (tmp_path / "torrents").iterdir()] == [valid.digest.hex]
    assert sorted(path.name for path in folder.iterdir()) == [
        "0.torrent",
        "1.torrent",
        "announce",
        "cert",
        "key",
    ]
