"""Test swarms: a CA, a random blob and its torrent, and peers in their own processes."""

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
from common.ids import Digest, NodeId
from peer.cache import Credentials
from peer.torrent import make_metainfo
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
    path = folder / f"blob-{seed}-{size}"
    path.write_bytes(data)
    return Blob(path, Digest(hashlib.sha256(data).hexdigest()), data)


def credentials(ca: CertificateAuthority, digest: Digest, node: str, lifetime: float = 3600) -> Credentials:
    key = new_key()
    cert = issue_peer_cert(ca, load_csr(make_csr(key)), digest, NodeId(node), dt.timedelta(seconds=lifetime))
    return Credentials(cert_pem(cert), key_pem(key), "https://127.0.0.1:9/announce?key=test")


@dataclass
class Swarm:
    root: Path
    blob: Blob
    ca: CertificateAuthority = field(default_factory=lambda: new_ca("test swarm"))
    piece_size: int = 256 * 1024
    procs: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metainfo = make_metainfo(self.blob.path, self.blob.digest, self.ca.cert_pem, self.piece_size)
        self.metainfo_path = self.root / f"torrent-{self.piece_size}"
        self.metainfo_path.write_bytes(self.metainfo)

    def credentials(
        self, node: str, ca: CertificateAuthority | None = None, digest: Digest | None = None
    ) -> Credentials:
        return credentials(ca or self.ca, digest or self.blob.digest, node)

    def job(self, node: str, ip: str, role: str, creds: Credentials | None = None, **extra: Any) -> Job:
        creds = creds or self.credentials(node)
        folder = self.root / node
        folder.mkdir(exist_ok=True)
        (folder / "cert.pem").write_bytes(creds.cert_pem)
        (folder / "key.pem").write_bytes(creds.key_pem)
        return Job(
            cache_dir=str(folder / "cache"),
            listen=f"{ip}:0",
            digest=str(self.blob.digest),
            metainfo=str(self.metainfo_path),
            cert=str(folder / "cert.pem"),
            key=str(folder / "key.pem"),
            role=role,
            blob=str(self.blob.path),
            **extra,
        )

    async def start(self, job: Job, wrap: tuple[str, ...] = ()) -> Node:
        """Start a peer process (under `wrap`, such as `ip netns exec NS`); returns once it serves."""
        path = job.write(Path(job.cache_dir).parent / "job.json")
        proc = await asyncio.create_subprocess_exec(
            *wrap, sys.executable, "-m", "tests.peer.node", str(path), stdout=asyncio.subprocess.PIPE
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

    def cached(self) -> Path:
        return Path(self.job.cache_dir) / "blobs" / "sha256" / Digest.parse(self.job.digest).hex
