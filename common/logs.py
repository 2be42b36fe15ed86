"""JSON log lines on stderr, and the one structured line per HTTP request.

Nothing secret goes in: request lines carry the path without its query string (announce keys ride
there) and never a header.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp import web

from common.errors import Handler

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
QUIET_PATHS = frozenset({"/healthz", "/metrics"})  # never logged
# Every node announces every interval: per-request lines for these only at debug level.
DEBUG_PATHS = frozenset({"/announce", "/scrape"})

access_logger = logging.getLogger("shoal.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    response = await handler(request)
    if request.path not in QUIET_PATHS:
        level = logging.DEBUG if request.path in DEBUG_PATHS else logging.INFO
        access_logger.log(
            level,
            "%s %s %d",
            request.method,
            request.path,
            response.status,
            extra={
                "remote": request.remote,
                "status": response.status,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
    return response
