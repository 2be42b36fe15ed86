"""How a blob maps to chunks: the one place that knows it.

A blob of `size` bytes is cut into chunks of `chunk_size` bytes (the last one shorter); each chunk is
its own BitTorrent v2 torrent, published as soon as its origin has it from the registry, so a
cluster's nodes trade a layer's first chunks while its last ones are still coming from the registry.
A blob no larger than one chunk is one chunk. The tracker fixes `chunk_size` per blob at its first
join and tells every joiner.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_CHUNK_SIZE = 2**20


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    start: int  # byte offset in the blob
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start


def check_chunk_size(chunk_size: int) -> int:
    if chunk_size < MIN_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk size must be a power of two of at least {MIN_CHUNK_SIZE} bytes")
    return chunk_size


def plan(size: int, chunk_size: int) -> list[Chunk]:
    """The chunks of a blob of `size` bytes, in order; one (possibly empty) chunk at least."""
    check_chunk_size(chunk_size)
    if size < 0:
        raise ValueError("blob size must not be negative")
    count = max(1, -(-size // chunk_size))
    return [Chunk(i, i * chunk_size, min(size, (i + 1) * chunk_size)) for i in range(count)]


def chunks_in(chunks: list[Chunk], start: int, end: int) -> list[Chunk]:
    """The chunks that hold any byte of [start, end)."""
    return [chunk for chunk in chunks if chunk.start < end and chunk.end > start]
