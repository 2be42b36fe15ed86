"""The tracker's HTTP API: join, publish, progress, report, announce, scrape, CA, health, metrics.

Handlers parse at the edge, ask `auth`, `swarm` and `announce` for decisions, and raise `ApiError`;
`common.errors` writes every error body. BitTorrent endpoints answer bencoded `failure reason`s.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common import errors
from common.certs import CertificateAuthority, cert_pem, issue_peer_cert, load_csr
from common.errors import ApiError
from common.ids import Digest, InfoHash, NodeId, Repository
from common.logs import access_log_middleware
from tracker.announce import (
    KEY_PARAM,
    AnnounceKeys,
    encode_failure,
    encode_peers,
    encode_scrape,
    parse_announce,
    parse_scrape,
)
from tracker.auth import Denied, JoinAuthorizer
from tracker.client import LEASE_HEADER
from tracker.config import TrackerConfig
from tracker.metainfo import check_metainfo
from tracker.metrics import TrackerMetrics
from tracker.store import Change, Store, T
from tracker.swarm import (
    BlobState,
    Decision,
    LeaseLost,
    Peer,
    Role,
    decide_join,
    publish,
    record_progress,
    withdraw,
)

logger = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024  # metainfo of a large layer: 32 bytes of piece layer per piece
REPORT_REASONS = ("digest_mismatch", "bad_peer")
BENCODE = "text/plain"


@dataclass(frozen=True)
class Tracker:
    config: TrackerConfig
    ca: CertificateAuthority
    keys: AnnounceKeys
    store: Store
    authorizer: JoinAuthorizer
    metrics: TrackerMetrics


TRACKER = web.AppKey("tracker", Tracker)


def make_app(tracker: Tracker) -> web.Application:
    app = web.Application(
        middlewares=[access_log_middleware, errors.error_middleware], client_max_size=MAX_BODY
    )
    app[TRACKER] = tracker
    app.router.add_post("/v1/blobs/{digest}/join", join)
    app.router.add_post("/v1/blobs/{digest}/progress", progress)
    app.router.add_put("/v1/blobs/{digest}/torrent", put_torrent)
    app.router.add_post("/v1/blobs/{digest}/report", report)
    app.router.add_get("/announce", announce)
    app.router.add_get("/scrape", scrape)
    app.router.add_get("/v1/ca", get_ca)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def join(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    try:
        return await _join(request, tracker)
    except Denied as denied:
        tracker.metrics.join_denied.labels(denied.reason).inc()
        code = {400: errors.BAD_REQUEST, 401: errors.UNAUTHORIZED}.get(denied.status, errors.DENIED)
        raise ApiError(code, denied.message) from None


async def _join(request: web.Request, tracker: Tracker) -> web.Response:
    config = tracker.config
    digest = _digest(request)
    try:
        body = await _json_body(request)
        registry = config.registry(_string(body, "registry"))
        if registry is None:
            raise ValueError(f"registry {body['registry']!r} is not served by this tracker")
        repository = Repository.parse(_string(body, "repository"))
        node = NodeId.parse(_string(body, "node"))
        csr = load_csr(_string(body, "csr"))
    except ValueError as exc:
        raise Denied("bad_request", 400, str(exc)) from None
    authorization = request.headers.get("Authorization")
    grant = await tracker.authorizer.authorize(registry, repository, digest, authorization)

    now, token = time.time(), secrets.token_urlsafe(24)

    def decide(state: BlobState) -> tuple[tuple[Decision, BlobState], BlobState]:
        decision, new = decide_join(state, str(node), grant.size or 0, token, now, config.origin_lease)
        return (decision, new), new

    decision, state = await tracker.store.update_blob(digest, decide)
    tracker.metrics.joins.labels(decision.role.value).inc()
    logger.info(
        "%s joins %s as %s", node, digest, decision.role.value,
        extra={"event": "join", "node": str(node), "digest": str(digest), "role": decision.role.value},
    )  # fmt: skip
    if decision.role is Role.WAIT:
        return web.json_response(
            {
                "role": "wait",
                "retry_after": round(decision.retry_after, 1),
                "origin_bytes": decision.origin_bytes,
            }
        )
    cert = issue_peer_cert(tracker.ca, csr, digest, node, dt.timedelta(seconds=config.peer_cert_ttl))
    expires_at = int(cert.not_valid_after_utc.timestamp())
    answer: dict[str, Any] = {
        "role": decision.role.value,
        "cert": cert_pem(cert).decode(),
        "ca": tracker.ca.cert_pem.decode(),
        "expires_at": expires_at,
    }
    if decision.lease is not None:
        answer |= {"lease": decision.lease.token, "lease_seconds": config.origin_lease}
    else:
        assert state.torrent is not None and state.info_hash is not None
        answer["torrent"] = base64.b64encode(state.torrent).decode()
        answer["announce"] = _announce_url(tracker, node, InfoHash.from_hex(state.info_hash), expires_at)
    return web.json_response(answer)


async def progress(request: web.Request) -> web.Response:
    """The origin's keep-alive: the lease lasts `origin_lease` past the last forward progress."""
    tracker = request.app[TRACKER]
    digest = _digest(request)
    body = await _json_body(request)
    token = _string(body, "lease")
    done = body.get("bytes")
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        raise ApiError(errors.BAD_REQUEST, "bytes must be a non-negative integer")
    lease = tracker.config.origin_lease
    await _update(tracker, digest, lambda s: (None, record_progress(s, token, done, time.time(), lease)))
    return web.json_response({"lease_seconds": lease})


async def put_torrent(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    digest = _digest(request)
    token = request.headers.get(LEASE_HEADER, "")
    metainfo = await request.read()
    ca_pem = tracker.ca.cert_pem

    def change(state: BlobState) -> tuple[BlobState, BlobState]:
        info_hash = check_metainfo(metainfo, digest, state.size, ca_pem)
        new = publish(state, token, metainfo, info_hash.hex, time.time())
        return new, new

    state = await _update(tracker, digest, change)
    assert state.publisher is not None and state.info_hash is not None
    tracker.metrics.published.inc()
    logger.info(
        "%s published the torrent of %s", state.publisher, digest,
        extra={"event": "published", "node": state.publisher, "digest": str(digest)},
    )  # fmt: skip
    expires_at = int(time.time()) + tracker.config.peer_cert_ttl
    info_hash = InfoHash.from_hex(state.info_hash)
    url = _announce_url(tracker, NodeId.parse(state.publisher), info_hash, expires_at)
    return web.json_response({"announce": url, "info_hash": info_hash.hex})


async def report(request: web.Request) -> web.Response:
    """A node holding an announce key for the blob's torrent reports a bad torrent or peer."""
    tracker = request.app[TRACKER]
    digest = _digest(request)
    body = await _json_body(request)
    reason, key = _string(body, "reason"), _string(body, "key")
    if reason not in REPORT_REASONS:
        raise ApiError(errors.BAD_REQUEST, f"reason must be one of {', '.join(REPORT_REASONS)}")

    def change(state: BlobState) -> tuple[NodeId, BlobState]:
        if state.info_hash is None:
            raise ApiError(errors.BLOB_UNKNOWN, f"no torrent is published for {digest}")
        try:
            reporter = tracker.keys.verify(key, InfoHash.from_hex(state.info_hash), time.time())
        except ValueError as exc:
            raise ApiError(errors.DENIED, str(exc)) from None
        return reporter, withdraw(state) if reason == "digest_mismatch" else state

    reporter = await _update(tracker, digest, change)
    tracker.metrics.reports.labels(reason).inc()
    if reason == "digest_mismatch":
        tracker.metrics.withdrawn.inc()
    peer = str(body.get("peer", ""))[:64]
    logger.warning("%s reports %s on %s %s", reporter, reason, digest, peer)
    return web.json_response({"ok": True})


async def _update(tracker: Tracker, digest: Digest, change: Change[T]) -> T:
    """Apply a state change, translating the swarm's refusals into API errors."""
    try:
        return await tracker.store.update_blob(digest, change)
    except LeaseLost as exc:
        raise ApiError(errors.CONFLICT, str(exc)) from None
    except ValueError as exc:
        raise ApiError(errors.BAD_REQUEST, str(exc)) from None


async def announce(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    now = time.time()
    try:
        query = parse_announce(request.query_string)
        node = tracker.keys.verify(query.key, query.info_hash, now)
    except ValueError as exc:
        tracker.metrics.announce_failures.inc()
        return web.Response(body=encode_failure(str(exc)), content_type=BENCODE)
    interval = tracker.config.announce_interval
    peer = Peer(str(node), request.remote or "", query.port, query.left == 0, now + 2 * interval + 5)
    view = await tracker.store.announce(query.info_hash, peer, query.event == "stopped", query.numwant, now)
    tracker.metrics.announces.inc()
    return web.Response(body=encode_peers(view, interval), content_type=BENCODE)


async def scrape(request: web.Request) -> web.Response:
    """Counts for the swarms the request's announce key opens (BEP 48); others are left out."""
    tracker = request.app[TRACKER]
    now = time.time()
    try:
        hashes, key = parse_scrape(request.query_string)
        allowed = [ih for ih in hashes if _key_opens(tracker.keys, key, ih, now)]
        if hashes and not allowed:
            raise ValueError(f"{KEY_PARAM} does not open these torrents")
    except ValueError as exc:
        return web.Response(body=encode_failure(str(exc)), content_type=BENCODE)
    counts = {ih: await tracker.store.scrape(ih, now) for ih in allowed}
    return web.Response(body=encode_scrape(counts), content_type=BENCODE)


def _key_opens(keys: AnnounceKeys, key: str, info_hash: InfoHash, now: float) -> bool:
    try:
        keys.verify(key, info_hash, now)
    except ValueError:
        return False
    return True


async def get_ca(request: web.Request) -> web.Response:
    return web.Response(body=request.app[TRACKER].ca.cert_pem, content_type="application/x-pem-file")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[TRACKER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _announce_url(tracker: Tracker, node: NodeId, info_hash: InfoHash, expires_at: int) -> str:
    key = tracker.keys.sign(node, info_hash, expires_at)
    return f"{tracker.config.public_url}/announce?{KEY_PARAM}={key}"


def _digest(request: web.Request) -> Digest:
    try:
        return Digest.parse(request.match_info["digest"])
    except ValueError as exc:
        raise ApiError(errors.DIGEST_INVALID, str(exc)) from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(errors.BAD_REQUEST, "body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(errors.BAD_REQUEST, "body must be a JSON object")
    return body


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(errors.BAD_REQUEST, f"{name} must be a non-empty string")
    return value
