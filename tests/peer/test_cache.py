"""The blob cache: what enters it, what it evicts, what survives a restart."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.certs import new_ca
from common.ids import Digest
from peer.cache import BlobCache, DigestMismatch, Entry, SeedRecord, choose_evictions
from tests.peer.swarm import credentials, make_blob


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


def test_commit_admits_only_matching_bytes(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 10**9)
    blob = make_blob(tmp_path, 1000)
    wrong = cache.partial_path(d(1))
    wrong.write_bytes(blob.data)
    with pytest.raises(DigestMismatch):
        cache.commit(d(1), wrong)
    assert d(1) not in cache
    right = cache.partial_path(blob.digest)
    right.write_bytes(blob.data)
    assert cache.commit(blob.digest, right).read_bytes() == blob.data
    assert blob.digest in cache and not right.exists()


def test_restart_discards_partial_downloads(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10**9)
    cache.partial_path(d(1)).write_bytes(b"half a blob")
    BlobCache(tmp_path, 10**9)
    assert not any((tmp_path / "partial").iterdir())


def test_eviction_on_disk_spares_pinned_blobs(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 2500)
    blobs = [make_blob(tmp_path, 1000, seed=n) for n in range(3)]
    for age, blob in enumerate(blobs):
        path = cache.partial_path(blob.digest)
        path.write_bytes(blob.data)
        cache.commit(blob.digest, path)
        os.utime(cache.path(blob.digest), (1000 + age, 1000 + age))
    with cache.pin(blobs[0].digest):  # the oldest, but being served: marked used, never evicted
        assert cache.to_evict() == [blobs[1].digest]
        for digest in cache.to_evict():
            cache.delete(digest)
        with pytest.raises(RuntimeError):
            cache.delete(blobs[0].digest)
    assert [blob.digest in cache for blob in blobs] == [True, False, True]


def test_seeding_state_survives_a_restart_until_the_certificate_expires(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 10**9)
    ca = new_ca("swarm")
    valid, expired, uncached = (make_blob(tmp_path, 1000, seed=n) for n in range(3))
    for blob in (valid, expired):
        path = cache.partial_path(blob.digest)
        path.write_bytes(blob.data)
        cache.commit(blob.digest, path)
    for blob, lifetime in ((valid, 3600), (expired, -60), (uncached, 3600)):
        cache.save_seed(SeedRecord(blob.digest, b"metainfo", credentials(ca, blob.digest, "node", lifetime)))
    key = tmp_path / "torrents" / f"{valid.digest.hex}.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    records = BlobCache(tmp_path, 10**9).seeds()
    assert [record.digest for record in records] == [valid.digest]
    assert records[0].credentials.announce.startswith("https://")
    assert sorted(p.name for p in (tmp_path / "torrents").iterdir()) == sorted(
        f"{valid.digest.hex}{suffix}" for suffix in (".crt", ".json", ".key", ".torrent")
    )
