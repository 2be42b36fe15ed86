"""The node's blob cache: chunk files, and a marker per blob whose whole SHA-256 matched.

    <cache_dir>/chunks/<hex>/<index>    chunk files, written in place by libtorrent and by origins
    <cache_dir>/blobs/sha256/<hex>      the blob's marker (JSON: size, chunk_size), written atomically
                                        only once the chunk files, in order, hashed to the digest
    <cache_dir>/torrents/<hex>/         what seeding the blob again after a restart needs

A blob is in the cache exactly when its marker exists, so nothing half-done is ever served as
complete. Chunk files without a marker are a download cut short: deleted at start, never resumed.
The marker's modification time is the blob's last use: it survives restarts with no index to keep.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from common.chunks import chunks_in, plan
from common.ids import Digest

logger = logging.getLogger(__name__)

MARKER_MAX = 4096  # bytes; anything longer is not a marker (a whole blob of the older layout)
READ_SIZE = 1 << 20


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
    """A cached blob to seed again: its layout, credentials and the metainfo of every chunk."""

    digest: Digest
    size: int
    chunk_size: int
    credentials: Credentials
    metainfo: dict[int, bytes]


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
    """The files of the layout above. Methods that hash or sweep block: call them in a thread."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._root = root
        self._blobs = root / "blobs" / "sha256"
        self._chunks = root / "chunks"
        self._torrents = root / "torrents"
        self._pins: Counter[Digest] = Counter()
        for folder in (self._blobs, self._chunks):
            folder.mkdir(parents=True, exist_ok=True)
        self._torrents.mkdir(mode=0o700, exist_ok=True)
        self._sweep()

    # layout

    def marker(self, digest: Digest) -> Path:
        return self._blobs / digest.hex

    def chunk_dir(self, digest: Digest) -> Path:
        return self._chunks / digest.hex

    def chunk_path(self, digest: Digest, index: int) -> Path:
        return self.chunk_dir(digest) / str(index)

    def __contains__(self, digest: Digest) -> bool:
        return self.marker(digest).is_file()

    def layout(self, digest: Digest) -> tuple[int, int]:
        """A cached blob's (size, chunk_size); `KeyError` when it is not in the cache."""
        try:
            return _read_marker(self.marker(digest))
        except (OSError, ValueError):
            raise KeyError(f"{digest} is not in the cache") from None

    def ranges(self, digest: Digest, start: int, end: int) -> list[tuple[Path, int, int]]:
        """Where bytes [start, end) of a cached blob are: (chunk file, offset in it, length), in order."""
        size, chunk_size = self.layout(digest)
        spans = []
        for chunk in chunks_in(plan(size, chunk_size), start, min(end, size)):
            lo, hi = max(start, chunk.start), min(end, chunk.end)
            spans.append((self.chunk_path(digest, chunk.index), lo - chunk.start, hi - lo))
        return spans

    # entering, using, leaving

    def prepare(self, digest: Digest) -> None:
        """Make the folder a blob's chunk files are written to."""
        self.chunk_dir(digest).mkdir(exist_ok=True)

    def commit(self, digest: Digest, size: int, chunk_size: int) -> Path:
        """Check the whole SHA-256 over the chunk files in order, make them durable, then write the
        marker: the blob is in the cache. `DigestMismatch` (and no marker) when the bytes are wrong."""
        hasher = hashlib.sha256()
        for chunk in plan(size, chunk_size):
            with self.chunk_path(digest, chunk.index).open("rb") as file:
                if os.fstat(file.fileno()).st_size != chunk.length:
                    raise DigestMismatch(f"{digest}: chunk {chunk.index} is not {chunk.length} bytes")
                while data := file.read(READ_SIZE):
                    hasher.update(data)
                os.fsync(file.fileno())
        if hasher.hexdigest() != digest.hex:
            raise DigestMismatch(f"{digest}: the chunks do not hash to the digest")
        _fsync_dir(self.chunk_dir(digest))
        temporary = self._blobs / f".{digest.hex}.tmp"
        try:
            with temporary.open("w") as file:
                json.dump({"size": size, "chunk_size": chunk_size}, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.marker(digest))
        except OSError:  # a full disk: no half-written marker until the next start sweeps it
            temporary.unlink(missing_ok=True)
            raise
        _fsync_dir(self._blobs)
        logger.info("blob cached", extra={"digest": str(digest)})
        return self.marker(digest)

    @contextlib.contextmanager
    def pin(self, digest: Digest) -> Iterator[None]:
        """Keep `digest` from eviction while serving or fetching it; marks it used."""
        self._pins[digest] += 1
        try:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.marker(digest))
            yield
        finally:
            self._pins[digest] -= 1
            if not self._pins[digest]:
                del self._pins[digest]

    def entries(self) -> list[Entry]:
        entries = []
        for path in self._blobs.iterdir():
            with contextlib.suppress(ValueError, OSError):
                digest = Digest.parse(f"sha256:{path.name}")
                size, _ = _read_marker(path)
                entries.append(Entry(digest, size, path.stat().st_mtime))
        return entries

    def to_evict(self) -> list[Digest]:
        return choose_evictions(self.entries(), set(self._pins), self.max_bytes)

    def evict(self, digest: Digest) -> None:
        """`delete` a blob nobody is serving or fetching; `RuntimeError` when it is pinned."""
        if digest in self._pins:
            raise RuntimeError(f"{digest} is pinned")
        self.delete(digest)

    def delete(self, digest: Digest) -> None:
        """Remove a cached blob and its seeding state (the caller stopped seeding it first), pinned
        or not: a blob found wrong or unreadable must go now, and its readers find it gone and go
        to the registry. The marker goes first: a crash after it leaves chunk files that the next
        start deletes."""
        self.marker(digest).unlink(missing_ok=True)
        shutil.rmtree(self.chunk_dir(digest), ignore_errors=True)
        self.forget_seed(digest)
        logger.info("blob deleted", extra={"digest": str(digest)})

    def discard(self, digest: Digest) -> None:
        """Delete the chunk files of a blob that is not in the cache (a download given up)."""
        if digest in self:
            raise RuntimeError(f"{digest} is in the cache: delete it instead")
        shutil.rmtree(self.chunk_dir(digest), ignore_errors=True)
        self.forget_seed(digest)

    # seeding state

    def save_seed(self, digest: Digest, credentials: Credentials) -> None:
        """Keep a blob's credentials for seeding it after a restart, replacing any older state.
        The key and the announce URL (it carries an announce key) are 0600 from their first byte."""
        self.forget_seed(digest)
        folder = self._torrents / digest.hex
        folder.mkdir(mode=0o700)
        write_secret(folder / "key", credentials.key_pem)
        write_secret(folder / "announce", credentials.announce.encode())
        (folder / "cert").write_bytes(credentials.cert_pem)

    def save_chunk_torrent(self, digest: Digest, index: int, metainfo: bytes) -> None:
        """Keep chunk `index`'s metainfo beside the credentials; replaced whole or not at all."""
        path = self._torrents / digest.hex / f"{index}.torrent"
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(metainfo)
        os.replace(temporary, path)

    def forget_seed(self, digest: Digest) -> None:
        shutil.rmtree(self._torrents / digest.hex, ignore_errors=True)

    def seeds(self) -> list[SeedRecord]:
        """Seeding state of cached blobs whose certificate is still valid; the rest is dropped."""
        records = []
        for folder in self._torrents.iterdir():
            with contextlib.suppress(ValueError):
                digest = Digest.parse(f"sha256:{folder.name}")
                record = self._load_seed(digest) if digest in self else None
                if record is not None and record.credentials.not_after > time.time():
                    records.append(record)
                    continue
            shutil.rmtree(folder, ignore_errors=True)
        return records

    def _load_seed(self, digest: Digest) -> SeedRecord | None:
        folder = self._torrents / digest.hex
        try:
            size, chunk_size = self.layout(digest)
            credentials = Credentials(
                (folder / "cert").read_bytes(),
                (folder / "key").read_bytes(),
                (folder / "announce").read_text(),
            )
            credentials.not_after  # noqa: B018 - parses the certificate
            count = len(plan(size, chunk_size))
            metainfo = {index: (folder / f"{index}.torrent").read_bytes() for index in range(count)}
        except (OSError, ValueError, KeyError):
            logger.warning("dropping incomplete or unreadable seeding state", extra={"digest": str(digest)})
            return None
        return SeedRecord(digest, size, chunk_size, credentials, metainfo)

    def _sweep(self) -> None:
        """Undo what a crash left: markers that are not (a temporary file, a blob file of the older
        layout, one whose chunks are gone), then chunk files with no marker, older-layout files."""
        for path in self._blobs.iterdir():
            try:
                digest = Digest.parse(f"sha256:{path.name}")
                _read_marker(path)
                if self.chunk_dir(digest).is_dir():
                    continue
            except (ValueError, OSError):
                pass
            path.unlink()
        for folder in self._chunks.iterdir():
            if not (self._blobs / folder.name).is_file():
                shutil.rmtree(folder)
        shutil.rmtree(self._root / "partial", ignore_errors=True)
        for path in self._torrents.iterdir():
            if not path.is_dir():
                path.unlink()


def _read_marker(path: Path) -> tuple[int, int]:
    with path.open("rb") as file:
        data = file.read(MARKER_MAX + 1)
    fields = json.loads(data) if len(data) <= MARKER_MAX else None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: not a marker")
    size, chunk_size = fields.get("size"), fields.get("chunk_size")
    if not isinstance(size, int) or not isinstance(chunk_size, int):
        raise ValueError(f"{path}: not a marker")
    plan(size, chunk_size)  # raises for a layout no blob can have
    return size, chunk_size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
