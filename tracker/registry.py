"""The tracker's view of a registry: "is this blob in that repository, for this credential?", and
the blob's own bytes when a report must be checked against them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from enum import Enum
from typing import Protocol

import aiohttp

from common.ids import Digest, Repository
from common.tls import client_ssl_context
from tracker.config import RegistryConfig

READ_SIZE = 1 << 20  # the most one read of a blob body holds: bounds memory per verification


class BlobAnswer(Enum):
    PRESENT = "present"
    UNAUTHORIZED = "unauthorized"  # the registry refused the credential
    ABSENT = "absent"  # not in that repository, or the credential may not see it


class RegistryUnavailable(Exception):
    """The registry could not answer; not a refusal."""


class BlobChecker(Protocol):
    async def check_blob(
        self,
        registry: RegistryConfig,
        repository: Repository,
        digest: Digest,
        authorization: str | None,
    ) -> tuple[BlobAnswer, int | None]: ...


class BlobReader(Protocol):
    def read_blob(
        self,
        registry: RegistryConfig,
        repository: Repository,
        digest: Digest,
        authorization: str | None,
        start: int,
        end: int,
    ) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of the blob, in order, in pieces of bounded size."""


class HttpRegistry:
    """Asks the registry with `HEAD /v2/<repo>/blobs/<digest>` and reads blobs with `GET`, both with
    the caller's own credential."""

    def __init__(self, session: aiohttp.ClientSession, registries: tuple[RegistryConfig, ...], timeout: int):
        self._session = session
        self._ssl = {r.host: client_ssl_context(str(r.ca) if r.ca else None) for r in registries}
        # A blob takes as long as it takes; only a silent registry is a failure.
        self._read_timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)

    async def check_blob(
        self,
        registry: RegistryConfig,
        repository: Repository,
        digest: Digest,
        authorization: str | None,
    ) -> tuple[BlobAnswer, int | None]:
        url = f"{registry.url}/v2/{repository}/blobs/{digest}"
        headers = {"Authorization": authorization} if authorization else {}
        try:
            async with self._session.head(url, headers=headers, ssl=self._ssl[registry.host]) as resp:
                if resp.status == 200:
                    return BlobAnswer.PRESENT, resp.content_length
                if resp.status == 401:
                    return BlobAnswer.UNAUTHORIZED, None
                if resp.status in (403, 404):
                    return BlobAnswer.ABSENT, None
                raise RegistryUnavailable(f"registry answered HEAD with {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryUnavailable(f"registry unreachable: {exc.__class__.__name__}") from None

    async def read_blob(
        self,
        registry: RegistryConfig,
        repository: Repository,
        digest: Digest,
        authorization: str | None,
        start: int,
        end: int,
    ) -> AsyncGenerator[bytes, None]:
        """`GET` with `Range`, redirects followed: a registry with a storage redirect answers 307 to
        another host, and aiohttp drops `Authorization` when the origin changes, as dockerd does."""
        url = f"{registry.url}/v2/{repository}/blobs/{digest}"
        headers = {"Range": f"bytes={start}-{end - 1}"} | (
            {"Authorization": authorization} if authorization else {}
        )
        ssl = self._ssl[registry.host]
        try:
            async with self._session.get(url, headers=headers, ssl=ssl, timeout=self._read_timeout) as resp:
                skip = _skip_before(resp, start)
                left = end - start
                async for received in resp.content.iter_chunked(READ_SIZE):
                    cut = min(skip, len(received))
                    skip -= cut
                    data = received[cut : cut + left]
                    if data:
                        yield data
                        left -= len(data)
                    if not left:
                        return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryUnavailable(f"registry unreachable: {exc.__class__.__name__}") from None
        raise RegistryUnavailable(f"registry ended {digest} {left} bytes early")


def _skip_before(resp: aiohttp.ClientResponse, start: int) -> int:
    """How many leading bytes of the body come before `start`: none for a 206 that starts there,
    `start` for a registry (or storage) that ignored `Range` and sent the whole blob."""
    if resp.status == 200:
        return start
    if resp.status == 206:
        content_range = resp.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {start}-"):
            raise RegistryUnavailable(f"registry answered Range from {start} with {content_range!r}")
        return 0
    raise RegistryUnavailable(f"registry answered GET with {resp.status}")


@contextlib.asynccontextmanager
async def open_registry(registries: tuple[RegistryConfig, ...], timeout: int) -> AsyncIterator[HttpRegistry]:
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, auto_decompress=False) as session:
        yield HttpRegistry(session, registries, timeout)
