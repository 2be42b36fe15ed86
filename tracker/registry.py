"""The tracker's view of a registry: "is this blob in that repository, for this credential?"."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from enum import Enum
from typing import Protocol

import aiohttp

from common.ids import Digest, Repository
from common.tls import client_ssl_context
from tracker.config import RegistryConfig


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


class HttpBlobChecker:
    """Asks the registry with `HEAD /v2/<repo>/blobs/<digest>` and the caller's own credential."""

    def __init__(self, session: aiohttp.ClientSession, registries: tuple[RegistryConfig, ...]):
        self._session = session
        self._ssl = {r.host: client_ssl_context(str(r.ca) if r.ca else None) for r in registries}

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


@contextlib.asynccontextmanager
async def open_blob_checker(
    registries: tuple[RegistryConfig, ...], timeout: int
) -> AsyncIterator[HttpBlobChecker]:
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, auto_decompress=False) as session:
        yield HttpBlobChecker(session, registries)
