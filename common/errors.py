"""OCI error codes, declared once with their HTTP status, and the one place that writes them.

Handlers raise `ApiError`; `error_middleware` turns it (and any unexpected exception) into the
distribution-spec error body `{"errors": [{"code", "message"}]}`, so every error a client sees has
the same shape and every failure is logged once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: str
    status: int


BAD_REQUEST = ErrorCode("BAD_REQUEST", 400)  # not in the OCI list; used for malformed input
DIGEST_INVALID = ErrorCode("DIGEST_INVALID", 400)
NAME_INVALID = ErrorCode("NAME_INVALID", 400)
UNAUTHORIZED = ErrorCode("UNAUTHORIZED", 401)
DENIED = ErrorCode("DENIED", 403)
BLOB_UNKNOWN = ErrorCode("BLOB_UNKNOWN", 404)
NOT_FOUND = ErrorCode("NOT_FOUND", 404)
CONFLICT = ErrorCode("CONFLICT", 409)
UNSUPPORTED = ErrorCode("UNSUPPORTED", 415)
UNAVAILABLE = ErrorCode("UNAVAILABLE", 503)
BAD_GATEWAY = ErrorCode("BAD_GATEWAY", 502)
INTERNAL = ErrorCode("INTERNAL_ERROR", 500)


class ApiError(Exception):
    def __init__(self, error: ErrorCode, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.error = error
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def error_response(error: ErrorCode, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_body(error.code, message),
        content_type="application/json",
        headers=headers,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.error, exc.message, exc.headers)
    except web.HTTPException as exc:
        # aiohttp's own 404/405 for unknown routes: same body shape as everything else.
        if exc.status < 400:
            raise
        code = {404: NOT_FOUND, 405: UNSUPPORTED, 413: BAD_REQUEST}.get(exc.status, BAD_REQUEST)
        return error_response(ErrorCode(code.code, exc.status), exc.reason)
    except Exception:
        logger.exception("unhandled error", extra={"path": request.path})
        return error_response(INTERNAL, "internal error")
