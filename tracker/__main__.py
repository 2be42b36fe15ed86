"""`shoal-tracker --config FILE`: load the config once, run until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from common.config import config_from_args, parse_address
from common.service import main_entry, stop_on_signals
from common.tokens import TokenVerifier
from tracker.announce import AnnounceKeys
from tracker.auth import JoinAuthorizer
from tracker.ca import announce_secret, load_or_create_ca
from tracker.config import TrackerConfig
from tracker.metrics import TrackerMetrics
from tracker.registry import open_registry
from tracker.server import Tracker, make_app
from tracker.store import open_store

logger = logging.getLogger("tracker")


def parse_args(argv: list[str]) -> TrackerConfig:
    overrides = {
        "listen": '"ip:port"',
        "state_dir": "a directory",
        "store": "sqlite or a redis:// URL",
        "log_level": "debug, info, warning, error",
    }
    return config_from_args(
        TrackerConfig, argv, prog="shoal-tracker", description=__doc__, overrides=overrides
    )


def token_verifiers(config: TrackerConfig) -> dict[str, TokenVerifier]:
    verifiers = {}
    for registry in config.registries:
        if registry.token is not None:
            pem = registry.token.certs.read_bytes()
            verifiers[registry.host] = TokenVerifier.from_bundle(
                pem, registry.token.issuer, registry.token.service
            )
    return verifiers


def server_ssl_context(config: TrackerConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


@contextlib.asynccontextmanager
async def serving(app: web.Application, config: TrackerConfig) -> AsyncIterator[None]:
    host, port = parse_address(config.listen)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=server_ssl_context(config), backlog=1024)
    await site.start()
    logger.info("tracker listening on https://%s, public URL %s", config.listen, config.public_url)
    try:
        yield
    finally:
        await runner.cleanup()


async def run(config: TrackerConfig) -> None:
    ca = await asyncio.to_thread(load_or_create_ca, config.state_dir)
    stop = stop_on_signals()
    async with (
        open_store(config.store, config.state_dir) as store,
        open_registry(config.registries, config.upstream_timeout) as registry,
    ):
        authorizer = JoinAuthorizer(registry, token_verifiers(config), config.basic_auth_cache)
        keys = AnnounceKeys(announce_secret(ca))
        tracker = Tracker(config, ca, keys, store, authorizer, registry, TrackerMetrics())
        async with serving(make_app(tracker), config):
            await stop.wait()
            logger.info("stopping")


def main(argv: list[str] | None = None) -> None:
    main_entry("shoal-tracker", parse_args, run, argv)


if __name__ == "__main__":
    main()
