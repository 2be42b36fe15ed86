"""The libtorrent boundary: one session per node, alerts by notification, one object per torrent.

Every torrent is one chunk of a blob; all chunk torrents of a blob share the blob's torrent name
(what peer certificates are scoped to), so torrents are told apart by info-hash, never by name.

Everything that touches libtorrent lives here, and libtorrent's exceptions and error alerts become
`PeerError` here and nowhere else; a failing disk is a `DiskError` (a `PeerError`), whether
libtorrent or the node's own code met it. Alerts arrive through `set_alert_fd`: libtorrent writes
a byte to a pipe when its alert queue turns non-empty, the event loop wakes on the pipe and pops
the alerts. libtorrent never calls into Python (no GIL taken from its threads) and nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import libtorrent as lt

from common import bencoding
from common.chunks import Chunk
from common.ids import Digest, InfoHash
from peer.config import PeerConfig
from peer.torrent import CHUNK_KEY

logger = logging.getLogger(__name__)

A = TypeVar("A")

REMOVE_TIMEOUT = 10.0  # seconds; removal is posted back within milliseconds
LISTEN_TIMEOUT = 10.0

# RFC 7919 ffdhe2048. libtorrent wants DH parameters with every certificate and logs an error
# for an empty string; our EC keys never use them (no DHE-ECDSA suites), a standard group is right.
DH_PARAMS = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

ALERTS = (
    lt.alert_category.error
    | lt.alert_category.status
    | lt.alert_category.storage
    | lt.alert_category.piece_progress
    | lt.alert_category.tracker
)

TORRENT_FLAGS_OFF = (
    lt.torrent_flags.auto_managed  # queueing would leave all but a few cached blobs unseeded
    | lt.torrent_flags.paused
    | lt.torrent_flags.sequential_download  # ruins a swarm (DESIGN.md); streams use deadlines
)
# Private torrents, peers from one tracker only.
TORRENT_FLAGS_ON = lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex


class PeerError(Exception):
    """libtorrent refused or failed an operation."""


class DiskError(PeerError):
    """The disk failed a write or read of the node's blob files (full, failing): that blob cannot
    be kept on this node. `operation` says which, for `shoal_disk_errors_total`."""

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(message)
        self.operation = operation


@contextlib.contextmanager
def on_disk(operation: str) -> Iterator[None]:
    """OSError from the node's blob files as `DiskError`. Around file calls only: a broken
    connection is an OSError too."""
    try:
        yield
    except OSError as exc:
        raise DiskError(operation, f"{operation}: {exc}") from exc


def settings(config: PeerConfig) -> lt.settings_pack:
    """Session settings for a datacenter LAN (measurements in DESIGN.md and tests/bench/peer.py)."""
    return {
        "listen_interfaces": config.listen_interfaces,
        # The configured port or nothing: firewalls are opened for it.
        "listen_system_port_fallback": False,
        "max_retry_port_bind": 0,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        # uTP is slow and erratic on a LAN; TCP only.
        "enable_incoming_utp": False,
        "enable_outgoing_utp": False,
        # Short request queues: deep ones make leechers fetch the same blocks from several peers.
        "request_queue_time": 1,
        # libtorrent 2.1 buffers downloaded blocks in memory up to this before writing (100 MiB by
        # default: a 64 MiB blob never touched the disk until complete). 16 MiB is >100 ms at 1 Gbit/s.
        "max_queued_disk_bytes": 16 * 2**20,
        # Every peer is on the LAN here: a configured limit must apply to it.
        "ignore_limits_on_local_network": False,
        "upload_rate_limit": config.upload_rate_limit,
        # Every peer is trusted and wants the same blobs: unchoke them all. With libtorrent's default of
        # 8 slots per session, a seeder of 4 blobs to 7 leechers left whole swarms choked until
        # leechers stalled and went to the registry (tests/bench/rollout.py, 8 nodes).
        "unchoke_slots_limit": -1,
        # The one announce URL comes from our tracker's join answer, never from metainfo; the
        # mitigation refuses a loopback tracker whose URL has a query (our announce key).
        "ssrf_mitigation": False,
        # Disk threads hand every 16 KiB block to the network thread: ten of them (the default)
        # spent most CPU on lock contention; two cut CPU per GiB by a quarter and ran faster.
        "aio_threads": 2,
        "alert_mask": ALERTS,
        "alert_queue_size": 10000,
    }


@dataclass(frozen=True)
class Status:
    digest: str
    chunk: int
    name: str
    state: str
    progress: float
    peers: int
    downloaded: int
    uploaded: int
    failed: int  # bytes that failed their hash check


def load_chunk(metainfo: bytes, digest: Digest, chunk: Chunk) -> Torrent:
    """Parse the metainfo of `chunk` of `digest`; `PeerError` unless it is that chunk's torrent:
    named for the blob, carrying the chunk's index, one file of the chunk's length."""
    try:
        info = lt.torrent_info(metainfo)
    except RuntimeError as exc:
        raise PeerError(f"bad metainfo: {exc}") from None
    index: object = bencoding.decode(bytes(info.info_section())).get(CHUNK_KEY)  # libtorrent parsed it
    torrent = Torrent(info, digest, chunk.index)
    if torrent.name != digest.torrent_name:
        raise PeerError(f"metainfo names {torrent.name}, not {digest.torrent_name}")
    if index != chunk.index or _real_files(info) != 1 or torrent.size != chunk.length:
        raise PeerError(f"{torrent.label}: metainfo is not that chunk (index {index}, {torrent.size} bytes)")
    return torrent


def _real_files(info: lt.torrent_info) -> int:
    """Files other than the pad file v2 puts after a file that is not a whole number of pieces."""
    files = info.layout()
    return sum(not files.file_flags(i) & lt.file_storage.flag_pad_file for i in range(files.num_files()))


class Torrent:
    """One chunk torrent, in the session once `Session.add` took it, with awaitable pieces and alerts."""

    def __init__(self, info: lt.torrent_info, digest: Digest, index: int) -> None:
        self.info = info
        self.digest = digest
        self.index = index
        self.handle = lt.torrent_handle()  # set once added; alerts may arrive before that
        self.name: str = info.name()
        self.label = f"{self.name} chunk {index}"  # for errors and logs: the name is the blob's
        # The one file's size: total_size() counts the tail padding of v2 torrents.
        self.size: int = info.layout().file_size(0)
        self.info_hash = InfoHash.from_v2(info.info_hashes().v2.to_bytes())
        self.piece_size: int = info.piece_length()
        self.num_pieces: int = info.num_pieces()
        self.last_progress = time.monotonic()
        self.first_piece_at: float | None = None  # wall clock, for status and benchmarks
        self.finished_at: float | None = None
        self.failed: PeerError | None = None
        self._ended: PeerError | None = None  # failed or removed: no alert will ever come
        self._piece_waiters: defaultdict[int, list[asyncio.Future[None]]] = defaultdict(list)
        self._reads: defaultdict[int, list[asyncio.Future[bytes]]] = defaultdict(list)
        self._alert_waiters: defaultdict[type, list[asyncio.Future[Any]]] = defaultdict(list)

    @property
    def finished(self) -> bool:
        """Every piece verified: downloaded, found on disk when added, or trusted in seed mode
        (libtorrent posts torrent_finished_alert in all three cases)."""
        return self.finished_at is not None

    def have(self, piece: int) -> bool:
        with _translated(self.label):
            return bool(self.handle.have_piece(piece))

    async def wait_piece(self, piece: int) -> None:
        """Return once `piece` has passed its hash check."""
        if self.have(piece):
            return
        if self._ended is not None:  # no alert will ever resolve it
            raise self._ended
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._piece_waiters[piece].append(waiter)
        try:
            if not self.have(piece):  # it may have landed between the check and the append
                await waiter
        finally:
            _discard(self._piece_waiters, piece, waiter)

    async def read_piece(self, piece: int) -> bytes:
        """A verified piece's bytes, through libtorrent's disk cache (never the file: DESIGN.md)."""
        if self._ended is not None:
            raise self._ended
        reader: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._reads[piece].append(reader)
        try:
            if len(self._reads[piece]) == 1:
                with _translated(self.label):
                    self.handle.read_piece(piece)
            return await reader
        finally:
            _discard(self._reads, piece, reader)

    async def expect(self, alert: type[A]) -> A:
        """The next alert of this type for this torrent (register before causing it)."""
        if self._ended is not None:
            raise self._ended
        async with self._expecting(alert) as waiter:
            return await waiter

    def add_piece(self, piece: int, data: bytes) -> None:
        """Hand libtorrent a piece fetched elsewhere; it is hash-checked like one from a peer."""
        with _translated(self.label):
            self.handle.add_piece(piece, data, 0)

    def set_deadlines(self, pieces: range, step_ms: int, first_rank: int = 0) -> None:
        with _translated(self.label):
            for rank, piece in enumerate(pieces, first_rank):
                if not self.handle.have_piece(piece):
                    self.handle.set_piece_deadline(piece, rank * step_ms)

    def clear_deadlines(self, pieces: range) -> None:
        with _translated(self.label):
            for piece in pieces:
                self.handle.reset_piece_deadline(piece)

    async def wait_finished(self) -> None:
        """Return once every piece is verified (see `finished`)."""
        if not self.finished:
            await self.expect(lt.torrent_finished_alert)

    async def flush(self) -> None:
        """Wait until every downloaded byte is written to the file; the failure, when a write
        failed (a torrent is finished once its pieces verified, before they are written)."""
        if self._ended is not None:
            raise self._ended
        async with self._expecting(lt.cache_flushed_alert) as flushed:
            with _translated(self.label):
                self.handle.flush_cache()
            await flushed

    @contextlib.asynccontextmanager
    async def _expecting(self, alert: type[A]) -> AsyncIterator[asyncio.Future[A]]:
        """The next alert of a type, listened for before the caller triggers it: registered at
        once, since the alert may be popped before any task that would register it runs."""
        waiter: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._alert_waiters[alert].append(waiter)
        try:
            yield waiter
        finally:
            _discard(self._alert_waiters, alert, waiter)

    def connect(self, host: str, port: int) -> None:
        """Dial a peer (on libtorrent's one-second tick): the node names the peers the tracker
        gave it; libtorrent itself talks to no tracker."""
        with _translated(self.label):
            self.handle.connect_peer((host, port))

    def left(self) -> int:
        """Bytes still missing, as an announce's `left` reports them."""
        if self.finished:
            return 0
        with _translated(self.label):
            s = self.handle.status()
        return max(0, int(s.total_wanted) - int(s.total_wanted_done))

    def status(self) -> Status:
        with _translated(self.label):
            s = self.handle.status()
        return Status(
            str(self.digest),
            self.index,
            self.name,
            str(s.state),
            s.progress,
            s.num_peers,
            s.total_done,
            s.all_time_upload,
            s.total_failed_bytes,
        )

    def on_alert(self, alert: lt.alert) -> None:
        if isinstance(alert, lt.piece_finished_alert):
            self.last_progress = time.monotonic()
            self.first_piece_at = self.first_piece_at or time.time()
            _resolve(self._piece_waiters.pop(alert.piece_index, []), None)
        elif isinstance(alert, lt.read_piece_alert):
            self._on_read(alert)
        elif isinstance(alert, lt.torrent_finished_alert):
            self.finished_at = time.time()
        elif isinstance(alert, lt.torrent_error_alert | lt.file_error_alert) and self.failed is None:
            # A disk error posts file_error_alert, then torrent_error_alert: the first one says why.
            message = f"{self.label}: {alert.message()}"
            disk = isinstance(alert, lt.file_error_alert)
            self.failed = DiskError("torrent", message) if disk else PeerError(message)
            logger.error("torrent failed", extra={"torrent": self.label, "error": alert.message()})
        elif isinstance(alert, lt.hash_failed_alert):
            logger.warning(
                "piece failed its hash check", extra={"torrent": self.label, "piece": alert.piece_index}
            )
        _resolve(self._alert_waiters.pop(type(alert), []), alert)
        if self.failed is not None:
            self._fail_all(self.failed)

    def _on_read(self, alert: lt.read_piece_alert) -> None:
        readers = self._reads.pop(alert.piece, [])
        if alert.error.value() or self.failed is not None:
            # After a failed write the file, not the verified piece, is read: holes, say.
            why = f"reading piece {alert.piece}: {alert.error.message()}"
            error = self.failed or PeerError(f"{self.label}: {why}")
            for reader in readers:
                if not reader.done():
                    reader.set_exception(error)
        else:
            _resolve(readers, bytes(alert.buffer))

    def _fail_all(self, error: PeerError) -> None:
        self._ended = self._ended or error
        tables: list[defaultdict[Any, list[asyncio.Future[Any]]]] = [
            self._piece_waiters,
            self._reads,
            self._alert_waiters,
        ]
        for table in tables:
            for waiters in table.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)


class Session:
    """The node's libtorrent session, as an async context manager."""

    def __init__(self, config: PeerConfig) -> None:
        self._config = config
        self._torrents: dict[InfoHash, Torrent] = {}
        self._session: lt.session | None = None
        self._pipe: tuple[int, int] | None = None
        self._listening: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Session:
        loop = asyncio.get_running_loop()
        self._listening = loop.create_future()
        self._session = lt.session(settings(self._config))
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        self._pipe = (read_end, write_end)
        loop.add_reader(read_end, self._on_notify)
        self._session.set_alert_fd(write_end)
        self._on_notify()  # alerts posted before the fd was set
        try:
            await asyncio.wait_for(self._listening, LISTEN_TIMEOUT)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._session is not None and self._pipe is not None
        session, self._session = self._session, None
        asyncio.get_running_loop().remove_reader(self._pipe[0])
        for torrent in self._torrents.values():
            torrent._fail_all(PeerError("session closed"))
        self._torrents.clear()
        # Destroying a session joins its threads (and waits on stop announces): not on the loop.
        holder = [session]
        del session
        await asyncio.to_thread(holder.clear)
        for fd in self._pipe:  # only now: libtorrent may write to it until it is gone
            os.close(fd)

    @property
    def port(self) -> int:
        """The SSL listen port (the real one when `peer_listen` asked for port 0)."""
        assert self._session is not None
        return int(self._session.ssl_listen_port())

    async def add(self, torrent: Torrent, file: Path, cert_pem: bytes, key_pem: bytes, *, seed: bool) -> None:
        """Add a torrent (from `load_chunk`) whose one file is `file`; without `seed` libtorrent
        checks what the file already holds, with `seed` it trusts the file.

        Seed mode still verifies each piece the first time a peer asks for it, so a changed file
        is caught before it serves anything.
        """
        assert self._session is not None
        params = lt.add_torrent_params()
        params.ti = torrent.info
        params.save_path = str(file.parent)
        params.renamed_files = {0: str(file)}  # an absolute path: the chunk's own name on disk
        params.flags = (params.flags & ~TORRENT_FLAGS_OFF) | TORRENT_FLAGS_ON
        if seed:
            params.flags |= lt.torrent_flags.seed_mode
        if torrent.info_hash in self._torrents:
            raise PeerError(f"{torrent.label}: info-hash {torrent.info_hash} already in the session")
        self._torrents[torrent.info_hash] = torrent  # before adding: its first alerts come at once
        try:
            torrent.handle = await asyncio.to_thread(self._session.add_torrent, params)
            torrent.handle.set_ssl_certificate_buffer(cert_pem.decode(), key_pem.decode(), DH_PARAMS)
        except RuntimeError as exc:
            del self._torrents[torrent.info_hash]
            raise PeerError(f"{torrent.label}: cannot add: {exc}") from None

    async def remove(self, torrent: Torrent) -> None:
        """Take a torrent out of the session; its file stays."""
        assert self._session is not None
        if self._torrents.get(torrent.info_hash) is not torrent:
            return
        try:
            async with torrent._expecting(lt.torrent_removed_alert) as removed:
                with _translated(torrent.label):
                    self._session.remove_torrent(torrent.handle)
                await asyncio.wait_for(removed, timeout=REMOVE_TIMEOUT)
        except (TimeoutError, PeerError):  # a failed torrent fails its waiters on every alert
            logger.warning("no confirmation of a torrent's removal", extra={"torrent": torrent.label})
        finally:
            del self._torrents[torrent.info_hash]
            torrent._fail_all(PeerError(f"{torrent.label}: removed"))

    def _on_notify(self) -> None:
        assert self._session is not None and self._pipe is not None
        try:
            while os.read(self._pipe[0], 4096):
                pass
        except BlockingIOError:
            pass
        for alert in self._session.pop_alerts():
            self._dispatch(alert)

    def _on_listen(self, alert: lt.listen_succeeded_alert | lt.listen_failed_alert) -> None:
        if alert.socket_type != lt.socket_type_t.tcp_ssl or not self._listening or self._listening.done():
            return
        if isinstance(alert, lt.listen_failed_alert):
            self._listening.set_exception(
                PeerError(f"cannot listen on {self._config.peer_listen}: {alert.message()}")
            )
        else:
            self._listening.set_result(None)

    def _dispatch(self, alert: lt.alert) -> None:
        if isinstance(alert, lt.listen_succeeded_alert | lt.listen_failed_alert):
            self._on_listen(alert)
        elif isinstance(alert, lt.torrent_alert):
            torrent = self._torrents.get(_info_hash(alert))
            if torrent is not None:
                torrent.on_alert(alert)


def _info_hash(alert: lt.torrent_alert) -> InfoHash:
    """Which torrent an alert is about. A removed torrent's handle has lost its info-hash (all
    zeros), so its removal alert carries the info-hash itself."""
    hashes = alert.info_hashes if isinstance(alert, lt.torrent_removed_alert) else alert.handle.info_hashes()
    return InfoHash.from_v2(hashes.v2.to_bytes())


@contextlib.contextmanager
def _translated(name: str) -> Iterator[None]:
    """libtorrent raises RuntimeError (an invalid handle after removal, a bad argument)."""
    try:
        yield
    except RuntimeError as exc:
        raise PeerError(f"{name}: {exc}") from None


def _resolve(waiters: list[asyncio.Future[A]], value: A) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(value)


def _discard(table: dict[Any, list[asyncio.Future[Any]]], key: Any, waiter: asyncio.Future[Any]) -> None:
    waiters = table.get(key)
    if waiters and waiter in waiters:
        waiters.remove(waiter)
        if not waiters:
            del table[key]
