"""Test swarms: a CA, a random blob cut into chunks with their torrents, and peers in their own
processes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.certs import (
    CertificateAuthority,
    cert_pem,
    issue_peer_cert,
    key_pem,
    load_csr,
    make_csr,
    new_ca,
    new_key,
)
from common.chunks import MIN_CHUNK_SIZE, Chunk, plan
from common.ids import Digest, NodeId
from peer.cache import Credentials
from peer.torrent import make_chunk_metainfo
from tests.peer.node import Job

MiB = 2**20
EVENT_TIMEOUT = 60.0


@dataclass
class Blob:
    path: Path
    digest: Digest
    data: bytes = field(repr=False)  # pytest formats fixture values; 64 MiB of repr takes seconds

    @property
    def size(self) -> int:
        return len(self.data)


def make_blob(folder: Path, size: int, seed: int = 0) -> Blob:
    data = hashlib.shake_256(seed.to_bytes(8, "big")).digest(size) if size <= 4 * MiB else os.urandom(size)
    return blob_of(folder, data, f"blob-{seed}-{size}")


def blob_of(folder: Path, data: bytes, name: str) -> Blob:
    path = folder / name
    path.write_bytes(data)
    return Blob(path, Digest(hashlib.sha256(data).hexdigest()), data)


def one_chunk(size: int) -> int:
    """The chunk size that makes a blob of `size` bytes one chunk."""
    return max(MIN_CHUNK_SIZE, 1 << (size - 1).bit_length())


def chunk_metainfo(
    folder: Path, blob: Blob, chunk: Chunk, ca: CertificateAuthority, piece_size: int = 256 * 1024
) -> bytes:
    """Chunk `chunk` of `blob`'s torrent, as its origin would make it, hashed from a copy of its bytes."""
    path = folder / f"{blob.path.name}.chunk-{chunk.index}"
    path.write_bytes(blob.data[chunk.start : chunk.end])
    try:
        return make_chunk_metainfo(path, blob.digest, chunk.index, ca.cert_pem, piece_size)
    finally:
        path.unlink()


def credentials(ca: CertificateAuthority, digest: Digest, node: str, lifetime: float = 3600) -> Credentials:
    key = new_key()
    cert = issue_peer_cert(ca, load_csr(make_csr(key)), digest, NodeId(node), dt.timedelta(seconds=lifetime))
    return Credentials(cert_pem(cert), key_pem(key), "https://127.0.0.1:9/announce?key=test")


@dataclass
class Swarm:
    root: Path
    blob: Blob
    chunk_size: int = 0  # 0: the whole blob is one chunk
    ca: CertificateAuthority = field(default_factory=lambda: new_ca("test swarm"))
    piece_size: int = 256 * 1024
    procs: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chunk_size = self.chunk_size or one_chunk(self.blob.size)
        self.chunks = plan(self.blob.size, self.chunk_size)
        self.metainfo = [
            chunk_metainfo(self.root, self.blob, c, self.ca, self.piece_size) for c in self.chunks
        ]
        self.metainfo_paths = []
        for chunk, metainfo in zip(self.chunks, self.metainfo, strict=True):
            path = self.root / f"torrent-{self.chunk_size}-{self.piece_size}-{chunk.index}"
            path.write_bytes(metainfo)
            self.metainfo_paths.append(str(path))

    def credentials(
        self, node: str, ca: CertificateAuthority | None = None, digest: Digest | None = None
    ) -> Credentials:
        return credentials(ca or self.ca, digest or self.blob.digest, node)

    def job(
        self,
        node: str,
        ip: str,
        role: str,
        creds: Credentials | None = None,
        chunks: list[int] | None = None,
        **extra: Any,
    ) -> Job:
        """A peer that seeds `chunks` (role `seed`), leeches them (`fetch`), or seeds what its cache
        holds (`restart`); `chunks` defaults to all."""
        creds = creds or self.credentials(node)
        folder = self.root / node
        folder.mkdir(exist_ok=True)
        (folder / "cert.pem").write_bytes(creds.cert_pem)
        (folder / "key.pem").write_bytes(creds.key_pem)
        chosen = [chunk.index for chunk in self.chunks] if chunks is None else chunks
        return Job(
            cache_dir=str(folder / "cache"),
            listen=f"{ip}:0",
            digest=str(self.blob.digest),
            size=self.blob.size,
            chunk_size=self.chunk_size,
            metainfo=self.metainfo_paths,
            cert=str(folder / "cert.pem"),
            key=str(folder / "key.pem"),
            seed=chosen if role == "seed" else [],
            leech=chosen if role == "fetch" else [],
            restart=role == "restart",
            blob=str(self.blob.path),
            **extra,
        )

    async def start(self, job: Job, wrap: tuple[str, ...] = ()) -> Node:
        """Start a peer process (under `wrap`, such as `ip netns exec NS`); returns once it serves."""
        path = job.write(Path(job.cache_dir).parent / "job.json")
        proc = await asyncio.create_subprocess_exec(
            *wrap,
            sys.executable,
            "-m",
            "tests.peer.node",
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        node = Node(proc, job)
        self.procs.append(node)
        node.port = (await node.event("listening"))["port"]
        # Dialled before its torrent is in, a peer refuses the handshake and is not retried for a while.
        await node.event("ready")
        return node

    async def close(self) -> None:
        for node in self.procs:
            await node.stop()


@dataclass
class Node:
    proc: asyncio.subprocess.Process
    job: Job
    port: int = 0

    @property
    def address(self) -> str:
        return f"{self.job.listen.rpartition(':')[0]}:{self.port}"

    async def dial(self, address: str) -> None:
        """Have the peer dial one more peer, from now on."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"connect": address}).encode() + b"\n")
        await self.proc.stdin.drain()

    async def event(self, kind: str, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while line := await self.proc.stdout.readline():
                event: dict[str, Any] = json.loads(line)
                if event["event"] == kind:
                    return event
                if event["event"] == "failed":
                    raise AssertionError(f"peer failed: {event}")
        raise AssertionError(f"peer exited with {await self.proc.wait()} before {kind}")

    async def last_progress(self, seconds: float) -> dict[str, Any]:
        """The last progress event the peer prints within `seconds`."""
        assert self.proc.stdout is not None
        last: dict[str, Any] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while line := await self.proc.stdout.readline():
                    event = json.loads(line)
                    if event["event"] == "progress":
                        last = event
        return last

    async def reaches(self, key: str, value: float, seconds: float = 5.0) -> bool:
        """Whether a progress event within `seconds` has `key` at `value` at least (libtorrent
        updates its counters once a second)."""
        assert self.proc.stdout is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while line := await self.proc.stdout.readline():
                    event = json.loads(line)
                    if event["event"] == "progress" and event[key] >= value:
                        return True
        return False

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def cached(self) -> bytes:
        """The blob as the peer's cache holds it: its chunk files in order, once its marker is in."""
        return cached_bytes(Path(self.job.cache_dir), Digest.parse(self.job.digest))


def cached_bytes(cache_dir: Path, digest: Digest) -> bytes:
    assert (cache_dir / "blobs" / "sha256" / digest.hex).is_file(), "the blob is not in the cache"
    chunks = cache_dir / "chunks" / digest.hex
    return b"".join((chunks / str(i)).read_bytes() for i in range(len(list(chunks.iterdir()))))
