"""A peer in its own process, for tests and benchmarks: `python -m tests.peer.node JOB.json`.

The job file names the blob, its layout, the chunk torrents, the credentials and what to do; the
process prints one JSON line per event on stdout (`listening`, `ready`, `progress`, `complete`,
`failed`) and runs until terminated. Each line `{"connect": "ip:port"}` on stdin names one more
peer to dial, as an announce answer would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.ids import Digest
from peer.cache import Credentials
from peer.config import PeerConfig
from peer.engine import ChunkedBlob, Peer

REDIAL_SECONDS = 1.0
PROGRESS_SECONDS = 0.5


@dataclass
class Job:
    cache_dir: str
    listen: str  # "127.0.0.x:0"
    digest: str
    size: int
    chunk_size: int
    metainfo: list[str]  # per chunk, paths of files the test wrote
    cert: str
    key: str
    announce: str = "https://127.0.0.1:9/announce?key=test"
    seed: list[int] = field(default_factory=list)  # chunks written from `blob`, then seeded
    leech: list[int] = field(default_factory=list)  # chunks fetched from peers
    restart: bool = False  # seed what the cache holds, as after a restart
    blob: str = ""  # the blob's bytes, for `seed`
    connect: list[str] = field(default_factory=list)  # "ip:port" of peers to dial
    corrupt: bool = False  # seed all chunks, then alter them on disk (serves bad pieces)
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
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Peer(config) as peer:
        emit("listening", port=peer.port)
        blob = await start(peer, job)
        emit("ready")
        tasks = [
            asyncio.create_task(dial(blob, job.connect)),
            asyncio.create_task(listen(job.connect)),
            asyncio.create_task(report(blob)),
        ]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def start(peer: Peer, job: Job) -> ChunkedBlob:
    digest = Digest.parse(job.digest)
    if job.restart:
        found = peer.get(digest)
        assert found is not None, "the cached blob is not seeded after a restart"
        return found
    credentials = Credentials(Path(job.cert).read_bytes(), Path(job.key).read_bytes(), job.announce)
    metainfo = [Path(path).read_bytes() for path in job.metainfo]
    blob = await peer.open(digest, job.size, job.chunk_size, credentials)
    data = Path(job.blob).read_bytes() if job.seed else b""
    for index in job.seed:
        chunk = blob.chunks[index]
        blob.chunk_file(index).write_bytes(data[chunk.start : chunk.end])  # as an origin would
        if job.corrupt:  # checked in full first: seed mode would check each piece before sending it
            await blob.leech(index, metainfo[index])
        else:
            await blob.seed(index, metainfo[index])
    for index in job.leech:
        await blob.leech(index, metainfo[index])
    if job.corrupt:
        await corrupt(blob)
    return blob


async def corrupt(blob: ChunkedBlob) -> None:
    """Once the blob is cached (every piece checked), flip a byte in every piece: libtorrent
    serves them as they are."""
    await blob.completed()
    for chunk in blob.chunks:
        torrent = blob.torrent(chunk.index)
        assert torrent is not None
        with blob.chunk_file(chunk.index).open("r+b") as file:
            for piece in range(torrent.num_pieces):
                file.seek(piece * torrent.piece_size)
                byte = file.read(1)
                file.seek(piece * torrent.piece_size)
                file.write(bytes([byte[0] ^ 0xFF]))


async def dial(blob: ChunkedBlob, addresses: list[str]) -> None:
    while True:
        for address in addresses:
            host, _, port = address.rpartition(":")
            blob.connect(host, int(port))
        await asyncio.sleep(REDIAL_SECONDS)


async def listen(addresses: list[str]) -> None:
    """Add the peers named on stdin to `addresses`, which `dial` goes through."""
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while line := await reader.readline():
            addresses.append(json.loads(line)["connect"])
    finally:
        transport.close()


async def report(blob: ChunkedBlob) -> None:
    progress = asyncio.create_task(report_progress(blob))
    try:
        path = await blob.completed()
    except Exception as exc:
        emit("failed", error=f"{type(exc).__name__}: {exc}")
        return
    finally:
        progress.cancel()
    torrents = [torrent for chunk in blob.chunks if (torrent := blob.torrent(chunk.index))]
    first = [t.first_piece_at for t in torrents if t.first_piece_at is not None]
    finished = [t.finished_at for t in torrents if t.finished_at is not None]
    emit("complete", path=str(path), first_piece=min(first, default=None), finished=max(finished))
    await report_progress(blob)


async def report_progress(blob: ChunkedBlob) -> None:
    """The blob's progress, summed over its chunk torrents (`peers`: the most on any one)."""
    while True:
        statuses = blob.status()
        emit(
            "progress",
            progress=1 - blob.left() / blob.size,
            peers=max((s.peers for s in statuses), default=0),
            downloaded=sum(s.downloaded for s in statuses),
            uploaded=sum(s.uploaded for s in statuses),
            failed=sum(s.failed for s in statuses),
        )
        await asyncio.sleep(PROGRESS_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", type=Path)
    job = Job(**json.loads(parser.parse_args().job.read_text()))
    asyncio.run(run(job))


if __name__ == "__main__":
    main()
