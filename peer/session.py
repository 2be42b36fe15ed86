"""The libtorrent boundary: one session per node, alerts by notification, one object per torrent.

Everything that touches libtorrent lives here, and libtorrent's exceptions and error alerts become
`PeerError` here and nowhere else. Alerts arrive through `set_alert_fd`: libtorrent writes a byte
to a pipe when its alert queue turns non-empty, the event loop wakes on the pipe and pops the
alerts. libtorrent never calls into Python (no GIL taken from its threads) and nothing polls.
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

from common.ids import InfoHash
from peer.config import PeerConfig

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
    name: str
    state: str
    progress: float
    peers: int
    downloaded: int
    uploaded: int
    failed: int  # bytes that failed their hash check


class Torrent:
    """One torrent in the session, with awaitable pieces and alerts."""

    def __init__(self, info: lt.torrent_info) -> None:
        self.handle = lt.torrent_handle()  # set once added; alerts may arrive before that
        self.name: str = info.name()
        # The one file's size: total_size() counts the tail padding of v2 torrents.
        self.size: int = info.layout().file_size(0)
        self.info_hash = InfoHash.from_v2(info.info_hashes().v2.to_bytes())
        self.piece_size: int = info.piece_length()
        self.num_pieces: int = info.num_pieces()
        self.last_progress = time.monotonic()
        self.first_piece_at: float | None = None  # wall clock, for status and benchmarks
        self.finished_at: float | None = None
        self.failed: PeerError | None = None
        self._piece_waiters: defaultdict[int, list[asyncio.Future[None]]] = defaultdict(list)
        self._reads: defaultdict[int, list[asyncio.Future[bytes]]] = defaultdict(list)
        self._alert_waiters: defaultdict[type, list[asyncio.Future[Any]]] = defaultdict(list)

    def have(self, piece: int) -> bool:
        with _translated(self.name):
            return bool(self.handle.have_piece(piece))

    def is_seed(self) -> bool:
        with _translated(self.name):
            return bool(self.handle.status().is_seeding)

    async def wait_piece(self, piece: int) -> None:
        """Return once `piece` has passed its hash check."""
        if self.have(piece):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._piece_waiters[piece].append(waiter)
        try:
            if not self.have(piece):  # it may have landed between the check and the append
                await waiter
        finally:
            _discard(self._piece_waiters, piece, waiter)

    async def read_piece(self, piece: int) -> bytes:
        """A verified piece's bytes, through libtorrent's disk cache (never the file: DESIGN.md)."""
        reader: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._reads[piece].append(reader)
        try:
            if len(self._reads[piece]) == 1:
                with _translated(self.name):
                    self.handle.read_piece(piece)
            return await reader
        finally:
            _discard(self._reads, piece, reader)

    async def expect(self, alert: type[A]) -> A:
        """The next alert of this type for this torrent (register before causing it)."""
        waiter: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._alert_waiters[alert].append(waiter)
        try:
            return await waiter
        finally:
            _discard(self._alert_waiters, alert, waiter)

    def add_piece(self, piece: int, data: bytes) -> None:
        """Hand libtorrent a piece fetched elsewhere; it is hash-checked like one from a peer."""
        with _translated(self.name):
            self.handle.add_piece(piece, data, 0)

    def set_deadlines(self, pieces: range, step_ms: int, first_rank: int = 0) -> None:
        with _translated(self.name):
            for rank, piece in enumerate(pieces, first_rank):
                if not self.handle.have_piece(piece):
                    self.handle.set_piece_deadline(piece, rank * step_ms)

    def clear_deadlines(self, pieces: range) -> None:
        with _translated(self.name):
            for piece in pieces:
                self.handle.reset_piece_deadline(piece)

    async def wait_finished(self) -> None:
        """Return once every piece is downloaded and verified."""
        async with self._expecting(lt.torrent_finished_alert) as finished:
            if not self.is_seed():
                await finished

    async def flush(self) -> None:
        """Wait until every downloaded byte is written to the file."""
        async with self._expecting(lt.cache_flushed_alert) as flushed:
            with _translated(self.name):
                self.handle.flush_cache()
            await flushed

    async def rename(self, path: Path) -> None:
        """Move the torrent's file to `path` (rename(2) on one file system) and keep serving it."""
        async with self._expecting(lt.file_renamed_alert) as renamed:
            with _translated(self.name):
                self.handle.rename_file(0, str(path))
            await renamed

    @contextlib.asynccontextmanager
    async def _expecting(self, alert: type[A]) -> AsyncIterator[asyncio.Future[A]]:
        """The next alert of a type, listened for before the caller triggers it."""
        waiter = asyncio.ensure_future(self.expect(alert))
        try:
            yield waiter
        finally:
            waiter.cancel()

    def connect(self, host: str, port: int) -> None:
        """Dial a peer directly (tests, benchmarks); in a cluster peers come from the tracker."""
        with _translated(self.name):
            self.handle.connect_peer((host, port))

    def left(self) -> int:
        """Bytes still missing, as an announce's `left` reports them."""
        with _translated(self.name):
            s = self.handle.status()
        return max(0, int(s.total_wanted) - int(s.total_wanted_done))

    def status(self) -> Status:
        with _translated(self.name):
            s = self.handle.status()
        return Status(
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
        elif isinstance(alert, lt.torrent_error_alert | lt.file_error_alert | lt.file_rename_failed_alert):
            self.failed = PeerError(f"{self.name}: {alert.message()}")
            logger.error("torrent failed", extra={"torrent": self.name, "error": alert.message()})
        elif isinstance(alert, lt.hash_failed_alert):
            logger.warning(
                "piece failed its hash check", extra={"torrent": self.name, "piece": alert.piece_index}
            )
        _resolve(self._alert_waiters.pop(type(alert), []), alert)
        if self.failed is not None:
            self._fail_all(self.failed)

    def _on_read(self, alert: lt.read_piece_alert) -> None:
        readers = self._reads.pop(alert.piece, [])
        if alert.error.value():
            error = PeerError(f"{self.name}: reading piece {alert.piece}: {alert.error.message()}")
            for reader in readers:
                if not reader.done():
                    reader.set_exception(error)
        else:
            _resolve(readers, bytes(alert.buffer))

    def _fail_all(self, error: PeerError) -> None:
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
        self._torrents: dict[str, Torrent] = {}
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

    def get(self, name: str) -> Torrent | None:
        return self._torrents.get(name)

    async def add(
        self, metainfo: bytes, file: Path, cert_pem: bytes, key_pem: bytes, *, seed: bool
    ) -> Torrent:
        """Add a torrent whose one file is `file`; with `seed`, trust the file without a check.

        Seed mode still verifies each piece the first time a peer asks for it, so a changed file
        is caught before it serves anything.
        """
        assert self._session is not None
        try:
            info = lt.torrent_info(metainfo)
        except RuntimeError as exc:
            raise PeerError(f"bad metainfo: {exc}") from None
        params = lt.add_torrent_params()
        params.ti = info
        params.save_path = str(file.parent)
        params.renamed_files = {0: str(file)}  # an absolute path: the blob's own name on disk
        params.flags = (params.flags & ~TORRENT_FLAGS_OFF) | TORRENT_FLAGS_ON
        if seed:
            params.flags |= lt.torrent_flags.seed_mode
        torrent = Torrent(info)
        if torrent.name in self._torrents:
            raise PeerError(f"{torrent.name}: already in the session")
        self._torrents[torrent.name] = torrent
        try:
            torrent.handle = await asyncio.to_thread(self._session.add_torrent, params)
            torrent.handle.set_ssl_certificate_buffer(cert_pem.decode(), key_pem.decode(), DH_PARAMS)
        except RuntimeError as exc:
            del self._torrents[torrent.name]
            raise PeerError(f"{torrent.name}: cannot add: {exc}") from None
        return torrent

    async def remove(self, torrent: Torrent) -> None:
        """Take a torrent out of the session; its file stays."""
        assert self._session is not None
        if self._torrents.get(torrent.name) is not torrent:
            return
        try:
            async with torrent._expecting(lt.torrent_removed_alert) as removed:
                with _translated(torrent.name):
                    self._session.remove_torrent(torrent.handle)
                await asyncio.wait_for(removed, timeout=REMOVE_TIMEOUT)
        except TimeoutError:
            logger.warning("no confirmation of a torrent's removal", extra={"torrent": torrent.name})
        finally:
            del self._torrents[torrent.name]
            torrent._fail_all(PeerError(f"{torrent.name}: removed"))

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
            torrent = self._torrents.get(alert.torrent_name)
            if torrent is not None:
                torrent.on_alert(alert)


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
