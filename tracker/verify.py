"""Checking a digest-mismatch report against the registry's own bytes.

A node that assembled a blob whose SHA-256 is not its digest cannot tell which chunk was wrong:
each chunk passed its torrent's merkle check, so some torrent was made from other bytes. The
tracker reads the suspect chunks' byte ranges from the registry and computes each one's BEP 52
pieces root; a published torrent whose root differs is the liar.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

from common.chunks import Chunk
from common.ids import Digest, Repository
from tracker.config import RegistryConfig
from tracker.metainfo import BLOCK, merkle_root
from tracker.registry import BlobReader

# Bytes handed to the hashing thread at once: big enough that the hand-off costs nothing, small
# enough that memory per verification stays bounded.
HASH_BATCH = 4 << 20


class ChunkRoots:
    """Pieces roots of some chunks of a blob, from the blob's bytes fed in order from `start`.

    Chunk boundaries are multiples of the chunk size, itself a multiple of 16 KiB, so 16 KiB
    blocks counted from `start` (a chunk boundary) are exactly each chunk's merkle leaves.
    """

    def __init__(self, chunk_size: int, wanted: list[Chunk]):
        self._chunk_size = chunk_size
        self._leaves: dict[int, list[bytes]] = {chunk.index: [] for chunk in wanted}
        self._position = min(chunk.start for chunk in wanted)
        self._pending = b""

    def feed(self, data: bytes) -> None:
        """Hash whole blocks of `data` (blocking: call it in a thread)."""
        data = self._pending + data
        whole = len(data) - len(data) % BLOCK
        view = memoryview(data)
        for offset in range(0, whole, BLOCK):
            self._leaf(view[offset : offset + BLOCK])
        self._pending = data[whole:]

    def roots(self) -> dict[int, bytes]:
        """Chunk index -> pieces root, once every byte of the wanted chunks was fed."""
        if self._pending:
            self._leaf(memoryview(self._pending))  # the blob's last block, shorter than 16 KiB
            self._pending = b""
        return {index: merkle_root(leaves) for index, leaves in self._leaves.items()}

    def _leaf(self, block: memoryview) -> None:
        leaves = self._leaves.get(self._position // self._chunk_size)
        if leaves is not None:
            leaves.append(hashlib.sha256(block).digest())
        self._position += len(block)


async def registry_roots(
    reader: BlobReader,
    registry: RegistryConfig,
    repository: Repository,
    digest: Digest,
    authorization: str | None,
    chunk_size: int,
    wanted: list[Chunk],
) -> tuple[dict[int, bytes], int]:
    """The pieces roots of `wanted` from the registry's bytes, read in one ranged `GET` from the
    first wanted chunk to the end of the last; and how many bytes that read."""
    roots = ChunkRoots(chunk_size, wanted)
    start, end = min(c.start for c in wanted), max(c.end for c in wanted)
    batch = bytearray()
    async with contextlib.aclosing(
        reader.read_blob(registry, repository, digest, authorization, start, end)
    ) as stream:
        async for data in stream:
            batch += data
            if len(batch) >= HASH_BATCH:
                await asyncio.to_thread(roots.feed, bytes(batch))
                batch.clear()
    await asyncio.to_thread(roots.feed, bytes(batch))
    return roots.roots(), end - start
