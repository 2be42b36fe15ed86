"""The node's blob cache: complete, verified blobs only, least recently used evicted first.

    <cache_dir>/blobs/sha256/<hex>      complete blobs whose SHA-256 matched, entered by rename
    <cache_dir>/partial/<hex>           downloads in progress; discarded at start (never resumed)
    <cache_dir>/torrents/<hex>.*        what seeding the blob again after a restart needs

A blob's modification time is its last use: it survives restarts with no index to keep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.certs import write_secret
from common.ids import Digest
from peer.torrent import sha256_file

logger = logging.getLogger(__name__)


class DigestMismatch(Exception):
    """A blob's bytes do not hash to its digest: it never enters the cache."""


@dataclass(frozen=True)
class Entry:
    digest: Digest
    size: int
    last_used: float


@dataclass(frozen=True)
class Credentials:
    """What a node needs to join one blob's swarm: the tracker's answer plus the node's own key."""

    cert_pem: bytes
    key_pem: bytes  # made on the node; leaves it never, touches its disk only as a 0600 file
    announce: str  # full announce URL, key query included

    @property
    def not_after(self) -> float:
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_after_utc.timestamp()


@dataclass(frozen=True)
class SeedRecord:
    digest: Digest
    metainfo: bytes
    credentials: Credentials


def choose_evictions(entries: list[Entry], pinned: set[Digest], max_bytes: int) -> list[Digest]:
    """The blobs to delete, least recently used first, until the rest fit in `max_bytes`.

    Pinned blobs (being served or fetched) are never chosen, even when they alone exceed it.
    """
    total = sum(entry.size for entry in entries)
    chosen = []
    for entry in sorted(entries, key=lambda e: (e.last_used, e.digest.hex)):
        if total <= max_bytes:
            break
        if entry.digest not in pinned:
            chosen.append(entry.digest)
            total -= entry.size
    return chosen


class BlobCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._blobs = root / "blobs" / "sha256"
        self._partial = root / "partial"
        self._torrents = root / "torrents"
        self._pins: Counter[Digest] = Counter()
        for folder in (self._blobs, self._partial, self._torrents):
            folder.mkdir(parents=True, exist_ok=True)
        self._discard_partials()

    def path(self, digest: Digest) -> Path:
        return self._blobs / digest.hex

    def partial_path(self, digest: Digest) -> Path:
        """Where a download of `digest` writes before it is verified."""
        return self._partial / digest.hex

    def __contains__(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    @contextlib.contextmanager
    def pin(self, digest: Digest) -> Iterator[Path]:
        """Keep `digest` from eviction while serving or fetching it; marks it used."""
        self._pins[digest] += 1
        try:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path(digest))
            yield self.path(digest)
        finally:
            self._pins[digest] -= 1
            if not self._pins[digest]:
                del self._pins[digest]

    def verify(self, digest: Digest, blob: Path) -> None:
        """Check the whole SHA-256 and make the bytes durable (blocking: call it in a thread)."""
        if sha256_file(blob) != digest.hex:
            raise DigestMismatch(f"{digest}: downloaded bytes do not match the digest")
        with blob.open("rb") as file:
            os.fsync(file.fileno())

    def commit(self, digest: Digest, blob: Path) -> Path:
        """Verify `blob` and move it into the cache by atomic rename (blocking: call it in a thread)."""
        self.verify(digest, blob)
        os.replace(blob, self.path(digest))
        self.entered(digest)
        return self.path(digest)

    def entered(self, digest: Digest) -> None:
        """A verified blob was renamed into place: make the rename durable."""
        fd = os.open(self._blobs, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        logger.info("blob cached", extra={"digest": str(digest)})

    def entries(self) -> list[Entry]:
        entries = []
        for path in self._blobs.iterdir():
            with contextlib.suppress(ValueError, FileNotFoundError):
                stat = path.stat()
                entries.append(Entry(Digest.parse(f"sha256:{path.name}"), stat.st_size, stat.st_mtime))
        return entries

    def to_evict(self) -> list[Digest]:
        return choose_evictions(self.entries(), set(self._pins), self.max_bytes)

    def delete(self, digest: Digest) -> None:
        """Remove a blob and its seeding state (the caller stopped seeding it first)."""
        if digest in self._pins:
            raise RuntimeError(f"{digest} is pinned")
        self.forget_seed(digest)
        self.path(digest).unlink(missing_ok=True)
        logger.info("blob evicted", extra={"digest": str(digest)})

    def save_seed(self, record: SeedRecord) -> None:
        """Keep what re-seeding after a restart needs; the key file is 0600 from its first byte."""
        self.forget_seed(record.digest)
        base = self._torrents / record.digest.hex
        write_secret(base.with_suffix(".key"), record.credentials.key_pem)
        base.with_suffix(".crt").write_bytes(record.credentials.cert_pem)
        base.with_suffix(".torrent").write_bytes(record.metainfo)
        base.with_suffix(".json").write_text(json.dumps({"announce": record.credentials.announce}))

    def forget_seed(self, digest: Digest) -> None:
        for suffix in (".json", ".torrent", ".crt", ".key"):
            (self._torrents / digest.hex).with_suffix(suffix).unlink(missing_ok=True)

    def seeds(self) -> list[SeedRecord]:
        """Seeding state of cached blobs whose certificate is still valid; the rest is dropped."""
        records = []
        for meta in self._torrents.glob("*.torrent"):
            with contextlib.suppress(ValueError):
                digest = Digest.parse(f"sha256:{meta.stem}")
                record = self._load_seed(digest)
                if record is not None and digest in self and record.credentials.not_after > time.time():
                    records.append(record)
                    continue
                self.forget_seed(digest)
        return records

    def _load_seed(self, digest: Digest) -> SeedRecord | None:
        base = self._torrents / digest.hex
        try:
            announce = json.loads(base.with_suffix(".json").read_text())["announce"]
            credentials = Credentials(
                base.with_suffix(".crt").read_bytes(), base.with_suffix(".key").read_bytes(), announce
            )
            credentials.not_after  # noqa: B018 - parses the certificate
            return SeedRecord(digest, base.with_suffix(".torrent").read_bytes(), credentials)
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("dropping unreadable seeding state", extra={"digest": str(digest)})
            return None

    def _discard_partials(self) -> None:
        """A download cut short by a crash is not resumed: it starts over from peers."""
        for path in self._partial.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
