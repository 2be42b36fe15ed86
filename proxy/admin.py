"""The node's admin endpoint: /healthz, /metrics, /status."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common import errors
from common.errors import ApiError
from common.logs import access_log_middleware
from proxy.config import NodeConfig
from proxy.metrics import NodeMetrics


@dataclass
class NodeState:
    config: NodeConfig
    metrics: NodeMetrics
    started: float = field(default_factory=time.monotonic)
    accepting: bool = False  # the proxy listener is up
    stopping: bool = False
    blobs: Callable[[], list[dict[str, Any]]] = list  # what the swarm path holds, for /status

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.config.node_id,
            "state": "stopping" if self.stopping else "serving" if self.accepting else "starting",
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "registries": [
                {"host": r.host, "url": r.base_url, "insecure": r.insecure} for r in self.config.registries
            ],
            "blobs": self.blobs(),
            "counters": self.metrics.snapshot(),
        }


STATE = web.AppKey("state", NodeState)


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.stopping or not state.accepting:
        raise ApiError(errors.UNAVAILABLE, "stopping" if state.stopping else "starting")
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].status())


def make_admin_app(state: NodeState) -> web.Application:
    app = web.Application(middlewares=[access_log_middleware, errors.error_middleware])
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    return app
