"""A peer in its own process, for tests and benchmarks: `python -m tests.peer.node JOB.json`.

The job file names the blob, the credentials and what to do; the process prints one JSON line
per event on stdout (`listening`, `complete`, `failed`) and runs until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.ids import Digest
from peer.cache import Credentials
from peer.config import PeerConfig
from peer.engine import Blob, Peer

REDIAL_SECONDS = 1.0
PROGRESS_SECONDS = 0.5


@dataclass
class Job:
    cache_dir: str
    listen: str  # "127.0.0.x:0"
    digest: str
    metainfo: str  # paths of files the test wrote
    cert: str
    key: str
    announce: str = "https://127.0.0.1:9/announce?key=test"
    role: str = "fetch"  # fetch | seed (the blob is put in the cache first) | restart (seed what is cached)
    blob: str = ""  # seed: the blob's bytes
    connect: list[str] = field(default_factory=list)  # "ip:port" of peers to dial
    corrupt: bool = False  # seed: alter the blob on disk once seeding (serves bad pieces)
    upload_rate_limit: int = 0

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)


async def run(job: Job) -> None:
    config = PeerConfig(
        cache_dir=Path(job.cache_dir), peer_listen=job.listen, upload_rate_limit=job.upload_rate_limit
    )
    digest = Digest.parse(job.digest)
    credentials = Credentials(Path(job.cert).read_bytes(), Path(job.key).read_bytes(), job.announce)
    metainfo = Path(job.metainfo).read_bytes()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Peer(config) as peer:
        emit("listening", port=peer.port)
        blob = await start(peer, job, digest, metainfo, credentials)
        emit("ready")
        tasks = [asyncio.create_task(dial(blob, job.connect)), asyncio.create_task(report(blob))]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def start(peer: Peer, job: Job, digest: Digest, metainfo: bytes, credentials: Credentials) -> Blob:
    if job.role == "seed":
        partial = peer.cache.partial_path(digest)
        partial.write_bytes(Path(job.blob).read_bytes())
        await peer.commit(digest, partial)
        blob = await peer.seed(digest, metainfo, credentials, check=job.corrupt)
        if job.corrupt:
            await corrupt(blob)
        return blob
    if job.role == "restart":
        found = peer.get(digest)
        assert found is not None, "the cached blob is not seeded after a restart"
        return found
    return await peer.fetch(digest, metainfo, credentials)


async def corrupt(blob: Blob) -> None:
    """Once the full check passed, flip a byte in every piece: libtorrent serves them as is."""
    while not blob.torrent.is_seed():
        await asyncio.sleep(0.05)
    path = await blob.complete()
    with path.open("r+b") as file:
        for piece in range(blob.torrent.num_pieces):
            file.seek(piece * blob.torrent.piece_size)
            byte = file.read(1)
            file.seek(piece * blob.torrent.piece_size)
            file.write(bytes([byte[0] ^ 0xFF]))


async def dial(blob: Blob, addresses: list[str]) -> None:
    while True:
        for address in addresses:
            host, _, port = address.rpartition(":")
            blob.connect(host, int(port))
        await asyncio.sleep(REDIAL_SECONDS)


async def report(blob: Blob) -> None:
    progress = asyncio.create_task(report_progress(blob))
    try:
        path = await blob.complete()
    except Exception as exc:
        emit("failed", error=str(exc))
        return
    finally:
        progress.cancel()
    torrent = blob.torrent
    emit("complete", path=str(path), first_piece=torrent.first_piece_at, finished=torrent.finished_at)
    await report_progress(blob)


async def report_progress(blob: Blob) -> None:
    while True:
        emit("progress", **asdict(blob.torrent.status()))
        await asyncio.sleep(PROGRESS_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", type=Path)
    job = Job(**json.loads(parser.parse_args().job.read_text()))
    asyncio.run(run(job))


if __name__ == "__main__":
    main()
