"""`shoal-node --config FILE`: load the config once, run until SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from common.config import config_from_args, parse_address
from common.service import main_entry, stop_on_signals
from common.tasks import spawn
from common.tls import client_ssl_context
from peer.config import PeerConfig
from peer.engine import Peer
from proxy.admin import NodeState, make_admin_app
from proxy.announcer import Announcer
from proxy.blobs import BlobSource, UpstreamBlobSource
from proxy.ca import LeafContexts, ca_files, node_ca
from proxy.config import NodeConfig
from proxy.metrics import NodeMetrics
from proxy.p2p import P2PBlobSource
from proxy.server import ProxyServer
from proxy.upstream import Upstream, open_upstream
from tracker.client import TrackerClient

logger = logging.getLogger("proxy")

TRACKER_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)


def parse_args(argv: list[str]) -> NodeConfig:
    overrides = {
        "listen": 'loopback "ip:port"',
        "admin": '"ip:port"',
        "tracker": "URL",
        "node_id": "a name",
        "log_level": "debug, info, warning, error",
    }
    return config_from_args(NodeConfig, argv, prog="shoal-node", description=__doc__, overrides=overrides)


@contextlib.asynccontextmanager
async def admin_serving(state: NodeState) -> AsyncIterator[None]:
    host, port = parse_address(state.config.admin)
    runner = web.AppRunner(make_admin_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logger.info("admin listening", extra={"admin": state.config.admin})
    try:
        yield
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def layer_source(config: NodeConfig, upstream: Upstream, state: NodeState) -> AsyncIterator[BlobSource]:
    """The swarm (with its peer and tracker client) when a tracker is configured, else the registry."""
    if config.tracker is None:
        logger.warning("no tracker configured: every layer comes from the registry")
        yield UpstreamBlobSource(upstream, state.metrics)
        return
    peer_config = PeerConfig(
        cache_dir=config.cache_dir,
        cache_max_bytes=config.cache_max_bytes,
        peer_listen=config.peer_listen,
        stall_timeout=config.stall_timeout,
        upload_rate_limit=config.peer_upload_limit,
    )
    tracker_ssl = client_ssl_context(str(config.tracker_ca) if config.tracker_ca else None)
    async with Peer(peer_config) as peer, aiohttp.ClientSession(timeout=TRACKER_TIMEOUT) as session:
        logger.info("peer listening", extra={"port": peer.port, "tracker": config.tracker})
        tracker = TrackerClient(session, config.tracker, tracker_ssl)
        async with P2PBlobSource(config, peer, tracker, upstream, state.metrics) as source:
            state.blobs = source.status
            announcing = spawn(Announcer(peer, tracker).run(), name="announcer")
            try:
                yield source
            finally:
                announcing.cancel()


async def run(config: NodeConfig) -> None:
    """Serve until SIGTERM/SIGINT."""
    stop = stop_on_signals()
    metrics = NodeMetrics()
    state = NodeState(config, metrics)
    ca = node_ca(config.node_id)
    leaves = LeafContexts(ca)
    for registry in config.registries:  # the first handshake of each registry should be cheap too
        leaves.context(registry.name)
    hosts = [r.host for r in config.registries]
    # Exit order matters: the proxy drains while /healthz says "stopping", then the admin
    # endpoint goes, and the CA files are removed last.
    with ca_files(ca, config.docker_certs_dir, hosts):
        async with (
            open_upstream(config.registries, metrics) as upstream,
            admin_serving(state),
            layer_source(config, upstream, state) as source,
        ):
            proxy = ProxyServer(config, leaves, upstream, source, metrics)
            async with proxy.serving():
                state.accepting = True
                logger.info("node %s ready", config.node_id, extra={"registries": hosts})
                await stop.wait()
                state.stopping = True
                logger.info("stopping: draining connections for up to %d s", config.shutdown_grace)


def main(argv: list[str] | None = None) -> None:
    main_entry("shoal-node", parse_args, run, argv)


if __name__ == "__main__":
    main()
