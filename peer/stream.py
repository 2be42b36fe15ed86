"""In-order streaming of a chunk torrent's bytes as pieces verify, with a fallback on a stall.

The reader pulls; nothing runs ahead of it but libtorrent itself. Pieces within `window` of the
read position get deadlines (libtorrent fetches them first, from the fastest peers) so the first
byte comes fast, while the rest of the swarm keeps trading rarest-first: sequential download
would make every peer want the same pieces (DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from peer.session import PeerError, Torrent

# Deadlines only order the window: the next piece first, then each following one a bit later.
DEADLINE_STEP_MS = 20

Fallback = Callable[[int, int], AsyncIterator[bytes]]
"""`fallback(start, end)`: the torrent's bytes [start, end) from elsewhere (the registry, by Range).
Offsets are the torrent's own: for a chunk torrent the caller adds the chunk's start in the blob."""


class Stalled(Exception):
    """No piece arrived for the stall timeout; bytes [offset, end) were not streamed."""

    def __init__(self, offset: int, end: int) -> None:
        super().__init__(f"swarm stalled with bytes {offset}-{end} missing")
        self.offset = offset
        self.end = end


async def stream(
    torrent: Torrent,
    start: int,
    end: int,
    *,
    window: int,
    stall_timeout: float,
    fallback: Fallback | None = None,
) -> AsyncIterator[bytes]:
    """Yield bytes [start, end) in order, each piece as soon as it verifies.

    On a stall, with `fallback` the rest of the range comes from it (and goes into the torrent,
    so the blob still completes and can be seeded); without, `Stalled` is raised.
    """
    size = torrent.piece_size
    position = start
    ahead = _Window(torrent, window)
    try:
        while position < end:
            piece = position // size
            ahead.advance(piece)
            try:
                await _wait(torrent, piece, stall_timeout)
                data = await torrent.read_piece(piece)
            except (Stalled, PeerError):  # a stall, or the torrent failed or went away
                if fallback is None:
                    raise Stalled(position, end) from None
                async for chunk in _refill(torrent, position, end, fallback):
                    yield chunk
                return
            chunk = data[position - piece * size : end - piece * size]
            position += len(chunk)
            yield chunk
    finally:
        ahead.close()


class _Window:
    """The deadlines over the next pieces; cleared when the reader stops, early or not."""

    def __init__(self, torrent: Torrent, size: int) -> None:
        self._torrent = torrent
        self._size = size
        self._pieces = range(0)

    def advance(self, piece: int) -> None:
        ahead = range(piece, min(piece + self._size, self._torrent.num_pieces))
        new = range(max(piece, self._pieces.stop), ahead.stop)  # the reader only moves forward
        self._torrent.set_deadlines(new, DEADLINE_STEP_MS, first_rank=new.start - piece)
        self._pieces = ahead

    def close(self) -> None:
        with contextlib.suppress(PeerError):  # the torrent may be gone already
            self._torrent.clear_deadlines(self._pieces)


async def _wait(torrent: Torrent, piece: int, stall_timeout: float) -> None:
    """Wait for `piece`; `Stalled` once the torrent has gone `stall_timeout` without any piece.
    A piece already here is never a stall, however long ago the last one came (a slow reader)."""
    while not torrent.have(piece):
        left = torrent.last_progress + stall_timeout - time.monotonic()
        if left <= 0:
            raise Stalled(piece * torrent.piece_size, torrent.size)
        try:
            await asyncio.wait_for(torrent.wait_piece(piece), left)
            return
        except TimeoutError:
            continue


async def _refill(torrent: Torrent, position: int, end: int, fallback: Fallback) -> AsyncIterator[bytes]:
    """Stream [position, end) from `fallback`, fetched in whole pieces that go into the torrent."""
    size = torrent.piece_size
    piece = position // size
    offset = piece * size
    stop = min(torrent.size, -(-end // size) * size)
    pending = bytearray()
    async for chunk in fallback(offset, stop):
        lo, hi = max(position, offset), min(end, offset + len(chunk))
        if lo < hi:
            yield bytes(chunk[lo - offset : hi - offset])
        offset += len(chunk)
        pending += chunk
        while pending and len(pending) >= min(size, torrent.size - piece * size):
            length = min(size, torrent.size - piece * size)
            with contextlib.suppress(PeerError):  # the client's bytes matter more than the cache's
                if not torrent.have(piece):
                    torrent.add_piece(piece, bytes(pending[:length]))
            del pending[:length]
            piece += 1
    if offset != stop:
        raise EOFError(f"fallback gave bytes up to {offset}, {stop} expected")
