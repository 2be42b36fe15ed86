"""Reading blob ranges the way a report check does, from real HTTP servers that behave like a
registry with a storage redirect (distribution's `redirect` middleware, S3 and the like)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from common.ids import Digest, Repository
from tracker.config import RegistryConfig
from tracker.registry import RegistryUnavailable, open_registry

BLOB = Digest("a" * 64)
BODY = bytes(range(256)) * 5000
CREDENTIAL = "Bearer secret"


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def registry_with_storage(honour_range: bool) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A registry that redirects blob GETs to a storage host on another origin; the headers the
    storage host saw."""
    seen: list[dict[str, str]] = []

    async def storage(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        if honour_range:
            return web.Response(body=BODY)  # aiohttp answers Range itself: 206
        response = web.StreamResponse()  # a server that ignores Range: the whole body, 200
        response.content_length = len(BODY)
        await response.prepare(request)
        await response.write(BODY)
        return response

    storage_app = web.Application()
    storage_app.router.add_get("/object", storage)
    async with serving(storage_app) as storage_url:

        async def blob(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != CREDENTIAL:
                raise web.HTTPUnauthorized()
            raise web.HTTPTemporaryRedirect(f"{storage_url}/object")

        registry_app = web.Application()
        registry_app.router.add_get(f"/v2/team/app/blobs/{BLOB}", blob)
        async with serving(registry_app) as registry_url:
            yield registry_url, seen


@pytest.mark.parametrize("honour_range", [True, False], ids=["206", "200"])
async def test_reads_a_range_through_a_storage_redirect(honour_range: bool) -> None:
    async with registry_with_storage(honour_range) as (url, seen):
        config = RegistryConfig(host="registry.test:5000", url=url)
        async with open_registry((config,), timeout=5) as registry:
            pieces = [
                piece
                async for piece in registry.read_blob(
                    config, Repository.parse("team/app"), BLOB, CREDENTIAL, 300_001, 1_000_000
                )
            ]
    assert b"".join(pieces) == BODY[300_001:1_000_000]
    assert all(len(piece) <= 1 << 20 for piece in pieces)
    [storage_request] = seen
    assert "Authorization" not in storage_request  # never sent to another origin
    assert storage_request["Range"] == "bytes=300001-999999"


async def test_a_refused_or_short_read_is_unavailable() -> None:
    async with registry_with_storage(honour_range=True) as (url, _):
        config = RegistryConfig(host="registry.test:5000", url=url)
        async with open_registry((config,), timeout=5) as registry:
            repository = Repository.parse("team/app")
            with pytest.raises(RegistryUnavailable, match="401"):
                async for _ in registry.read_blob(config, repository, BLOB, "Bearer wrong", 0, 10):
                    pass
            with pytest.raises(RegistryUnavailable, match="early"):
                async for _ in registry.read_blob(config, repository, BLOB, CREDENTIAL, 0, len(BODY) + 5):
                    pass
