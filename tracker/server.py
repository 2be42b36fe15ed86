"""The tracker's HTTP API: join, sync, progress, chunk publish, report, announce, scrape, CA, health,
metrics.

Handlers parse at the edge, ask `auth`, `swarm` and `announce` for decisions, and raise `ApiError`;
`common.errors` writes every error body. BitTorrent endpoints answer bencoded `failure reason`s.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common import errors
from common.certs import CertificateAuthority, cert_pem, issue_peer_cert, key_id, load_csr
from common.errors import ApiError
from common.ids import Digest, InfoHash, NodeId, Repository, is_decimal
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
from tracker.auth import Denied, Grant, JoinAuthorizer
from tracker.client import LEASE_HEADER
from tracker.config import RegistryConfig, TrackerConfig
from tracker.events import BlobEvents, BlobLocks, RegistryLoad
from tracker.metainfo import check_metainfo, pieces_root
from tracker.metrics import TrackerMetrics
from tracker.registry import BlobReader, RegistryUnavailable
from tracker.store import Change, Store, T
from tracker.swarm import (
    MAX_SYNC_WAIT,
    BlobState,
    Lease,
    LeaseLost,
    Member,
    Peer,
    Rules,
    SwarmView,
    Visit,
    apply_verdicts,
    leased_chunk,
    news,
    next_expiry,
    publish,
    record_progress,
    start,
    to_verify,
    visit,
)
from tracker.verify import registry_roots

logger = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024  # metainfo of a large chunk: 32 bytes of piece layer per piece
MAX_JSON_BODY = 8 * 1024 * 1024  # the largest, a sync listing MAX_KNOWN info hashes, takes 4.4 MB
REPORT_REASONS = ("digest_mismatch", "bad_peer")
BENCODE = "text/plain"
# How often a long-poll re-reads the blob's version: other replicas' changes (through Redis) reach
# a waiting node at most this late; this process's own changes wake it at once.
POLL_SECONDS = 0.25
MAX_KNOWN = 100_000  # info hashes a sync may list: far more than any blob has chunks
_INFO_HASH_HEX = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Tracker:
    config: TrackerConfig
    ca: CertificateAuthority
    keys: AnnounceKeys
    store: Store
    authorizer: JoinAuthorizer
    registry: BlobReader
    metrics: TrackerMetrics
    events: BlobEvents = field(default_factory=BlobEvents)
    checks: BlobLocks = field(default_factory=BlobLocks)  # one report check per blob at a time
    load: RegistryLoad = field(default_factory=RegistryLoad)

    @property
    def rules(self) -> Rules:
        config = self.config
        return Rules(
            config.origin_lease, config.chunks_in_flight, config.announce_interval, config.lone_grace,
            config.registry_in_flight,
        )  # fmt: skip

    async def update_blob(self, digest: Digest, change: Change[T]) -> T:
        """`store.update_blob`, and the registry's load as the written state leaves it."""
        written: list[BlobState] = []

        def noted(state: BlobState) -> tuple[T, BlobState]:
            result, new = change(state)
            written[:] = [new]
            return result, new

        result = await self.store.update_blob(digest, noted)
        self.load.note(digest, written[0], time.time())
        return result

    def wake(self, digest: Digest, registry: str | None) -> None:
        """A chunk of `digest` stopped coming from the registry: long-polls of the blob and of the
        registry's other busy blobs re-decide, since a slot came free."""
        for blob in [digest, *self.load.neighbours(digest, registry)]:
            self.events.notify(blob)


TRACKER = web.AppKey("tracker", Tracker)


def make_app(tracker: Tracker) -> web.Application:
    app = web.Application(
        middlewares=[access_log_middleware, errors.error_middleware], client_max_size=MAX_BODY
    )
    app[TRACKER] = tracker
    app.on_shutdown.append(_end_long_polls)
    app.router.add_post("/v1/blobs/{digest}/join", join)
    app.router.add_post("/v1/blobs/{digest}/sync", sync)
    app.router.add_post("/v1/blobs/{digest}/progress", progress)
    app.router.add_put("/v1/blobs/{digest}/chunks/{index}/torrent", put_chunk_torrent)
    app.router.add_post("/v1/blobs/{digest}/report", report)
    app.router.add_get("/announce", announce)
    app.router.add_get("/scrape", scrape)
    app.router.add_get("/v1/ca", get_ca)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def _end_long_polls(app: web.Application) -> None:
    """aiohttp's shutdown hook runs before it waits for requests in flight: syncs answer with what
    they have, and their nodes ask again (another replica, or this one once restarted)."""
    app[TRACKER].events.close()


async def join(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    try:
        return await _join(request, tracker)
    except Denied as denied:
        tracker.metrics.join_denied.labels(denied.reason).inc()
        raise _refusal(denied) from None


async def _join(request: web.Request, tracker: Tracker) -> web.Response:
    config = tracker.config
    digest = _digest(request)
    try:
        body = await _json_body(request)
        registry, repository = _registry_and_repository(tracker, body)
        node = NodeId.parse(_string(body, "node"))
        csr = load_csr(_string(body, "csr"))
    except (ValueError, ApiError) as exc:
        raise Denied("bad_request", 400, str(exc)) from None
    grant = await _authorize(tracker, registry, repository, digest, request.headers.get("Authorization"))
    size = grant.size
    if size is None:
        raise ApiError(errors.UNAVAILABLE, "the registry did not give the blob's size")
    cert = issue_peer_cert(tracker.ca, csr, digest, node, dt.timedelta(seconds=config.peer_cert_ttl))
    expires_at = int(cert.not_valid_after_utc.timestamp())

    member = Member(node, key_id(csr.public_key()))
    now = time.time()
    swarm = await tracker.store.scrape(digest.swarm_id, now)

    def change(state: BlobState) -> tuple[tuple[Visit, BlobState], BlobState]:
        planned = start(state, size, config.chunk_size, registry.host)
        elsewhere = tracker.load.elsewhere(digest, planned.registry, now)
        seen, new = visit(planned, str(member), now, tracker.rules, swarm, _token, elsewhere)
        return (seen, new), new

    seen, state = await tracker.update_blob(digest, change)
    tracker.metrics.joins.inc()
    logger.info("%s joins %s", node, digest, extra={"event": "join", **_who(member), "digest": str(digest)})
    _visited(tracker, digest, member, seen)
    key = tracker.keys.sign(member, digest.swarm_id, expires_at)
    return web.json_response(
        {
            "cert": cert_pem(cert).decode(),
            "ca": tracker.ca.cert_pem.decode(),
            "expires_at": expires_at,
            "announce": f"{config.public_url}/announce?{KEY_PARAM}={key}",
            "key": key,
            "size": state.size,
            "chunk_size": state.chunk_size,
            "chunks": _chunks(state, [i for i, _ in state.published()]),
            "leases": _leases(seen.leases, config.origin_lease),
        }
    )


async def sync(request: web.Request) -> web.Response:
    """What the node has not seen: chunks published since, chunks withdrawn, leases it now holds.
    Long-polls up to `wait` seconds until one of those is new."""
    tracker = request.app[TRACKER]
    digest = _digest(request)
    body = await _json_body(request)
    key = _string(body, "key")
    known = _known(body.get("known", []))
    wait = body.get("wait", 0)
    if not isinstance(wait, int | float) or isinstance(wait, bool):
        raise ApiError(errors.BAD_REQUEST, "wait must be a number of seconds")
    member = _key_member(tracker, key, digest)
    tracker.metrics.syncs.inc()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(max(float(wait), 0.0), MAX_SYNC_WAIT)
    version = await tracker.store.blob_version(digest)
    swarm: SwarmView | None = await tracker.store.scrape(digest.swarm_id, time.time())
    while True:
        seen, state = await _sync_visit(tracker, digest, member, swarm)
        fresh, withdrawn = news(state, known)
        if fresh or withdrawn or seen.granted:
            break
        expiry = next_expiry(state, time.time(), tracker.rules)
        changed = await _changed(tracker, digest, version, expiry, deadline)
        if changed is None:
            break
        version, swarm = changed, None  # a dead swarm is judged once per call, not per re-check
    return web.json_response(
        {
            "chunks": _chunks(state, fresh),
            "withdrawn": withdrawn,
            "leases": _leases(seen.leases, tracker.config.origin_lease),
        }
    )


async def _sync_visit(
    tracker: Tracker, digest: Digest, member: Member, swarm: SwarmView | None
) -> tuple[Visit, BlobState]:
    now = time.time()

    def change(state: BlobState) -> tuple[tuple[Visit, BlobState], BlobState]:
        if state.size is None:
            raise ApiError(errors.BLOB_UNKNOWN, f"nobody joined {digest}: join first")
        elsewhere = tracker.load.elsewhere(digest, state.registry, now)
        seen, new = visit(state, str(member), now, tracker.rules, swarm, _token, elsewhere)
        return (seen, new), new

    seen, state = await tracker.update_blob(digest, change)
    _visited(tracker, digest, member, seen)
    return seen, state


async def _changed(
    tracker: Tracker, digest: Digest, version: int, expiry: float | None, deadline: float
) -> int | None:
    """Wait until the blob may have changed (this process notified, another replica wrote it, or a
    lease ran out so a chunk may be free): its version then; None once `deadline` passes."""
    loop = asyncio.get_running_loop()
    while (remaining := deadline - loop.time()) > 0:
        woken = await tracker.events.wait(digest, min(POLL_SECONDS, remaining))
        if tracker.events.closed:
            return None
        current = await tracker.store.blob_version(digest)
        if woken or current != version or (expiry is not None and time.time() >= expiry):
            return current
    return None


def _visited(tracker: Tracker, digest: Digest, member: Member, seen: Visit) -> None:
    """Count and log what a join or sync decided; wake long-polls when chunks were unpublished."""
    for index in seen.granted:
        tracker.metrics.chunk_leases.inc()
        logger.info(
            "%s leases chunk %d of %s", member.node, index, digest,
            extra={"event": "lease", **_who(member), "digest": str(digest), "chunk": index},
        )  # fmt: skip
    if seen.reset:
        logger.warning(
            "no live peer in the swarm of %s: chunks %s need origins again", digest, seen.reset,
            extra={"event": "reset", "digest": str(digest), "chunks": seen.reset},
        )  # fmt: skip
        tracker.events.notify(digest)


async def progress(request: web.Request) -> web.Response:
    """An origin's keep-alive: a chunk lease lasts `origin_lease` past its last forward progress."""
    tracker = request.app[TRACKER]
    digest = _digest(request)
    body = await _json_body(request)
    token = _string(body, "lease")
    done = body.get("bytes")
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        raise ApiError(errors.BAD_REQUEST, "bytes must be a non-negative integer")
    lease = tracker.config.origin_lease

    def change(state: BlobState) -> tuple[tuple[bool, str | None], BlobState]:
        fetched, new = record_progress(state, token, done, time.time(), lease)
        return (fetched, new.registry), new

    fetched, registry = await _update(tracker, digest, change)
    if fetched:  # the chunk's origin is no longer fetching: a long-poll may lease the next chunk
        tracker.wake(digest, registry)
    return web.json_response({"lease_seconds": lease})


async def put_chunk_torrent(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    digest = _digest(request)
    raw_index = request.match_info["index"]
    if not is_decimal(raw_index) or len(raw_index) > 9:
        raise ApiError(errors.BAD_REQUEST, "chunk index must be a non-negative integer")
    index = int(raw_index)
    token = request.headers.get(LEASE_HEADER, "")
    metainfo = await request.read()
    ca_pem = tracker.ca.cert_pem
    now = time.time()

    def change(state: BlobState) -> tuple[tuple[InfoHash, str], BlobState]:
        chunk = leased_chunk(state, index, token, now)  # the lease first: 409 before 400
        info_hash = check_metainfo(metainfo, digest, chunk, ca_pem)
        publisher = state.chunks[index].lease
        assert publisher is not None  # leased_chunk checked it
        return (info_hash, publisher.member), publish(state, index, token, metainfo, info_hash.hex, now)

    info_hash, publisher = await _update(tracker, digest, change)
    tracker.metrics.published.inc()
    who = _who(publisher)
    logger.info(
        "%s published chunk %d of %s", who["node"], index, digest,
        extra={"event": "published", **who, "digest": str(digest), "chunk": index},
    )  # fmt: skip
    tracker.events.notify(digest)
    return web.json_response({"info_hash": info_hash.hex})


async def report(request: web.Request) -> web.Response:
    """A node holding the blob's announce key reports a bad peer, or a blob whose assembled bytes
    do not match its digest; the latter is checked against the registry before anything changes."""
    tracker = request.app[TRACKER]
    digest = _digest(request)
    body = await _json_body(request)
    reason, key = _string(body, "reason"), _string(body, "key")
    if reason not in REPORT_REASONS:
        raise ApiError(errors.BAD_REQUEST, f"reason must be one of {', '.join(REPORT_REASONS)}")
    reporter = _key_member(tracker, key, digest)
    if reason == "bad_peer":
        tracker.metrics.reports.labels(reason).inc()
        peer = str(body.get("peer", ""))[:64]
        logger.warning(
            "%s reports bad peer %s on %s", reporter.node, peer, digest,
            extra={"event": "report", "reason": reason, **_who(reporter), "digest": str(digest)},
        )  # fmt: skip
        return web.json_response({"withdrawn": []})
    registry, repository = _registry_and_repository(tracker, body)
    authorization = request.headers.get("Authorization")
    try:
        await _authorize(tracker, registry, repository, digest, authorization)
    except Denied as denied:
        raise _refusal(denied) from None
    tracker.metrics.reports.labels(reason).inc()
    async with tracker.checks.hold(digest):
        withdrawn = await _check_report(tracker, digest, registry, repository, authorization, reporter)
    return web.json_response({"withdrawn": withdrawn})


async def _check_report(
    tracker: Tracker,
    digest: Digest,
    registry: RegistryConfig,
    repository: Repository,
    authorization: str | None,
    reporter: Member,
) -> list[int]:
    """Withdraw the published chunks whose pieces root differs from the registry's bytes; mark the
    others verified, so that another report of them costs no registry read."""
    state = await tracker.update_blob(digest, lambda s: (s, s))
    suspects = to_verify(state)
    withdrawn: list[int] = []
    if suspects and state.chunk_size is not None:
        plan = state.plan()
        try:
            roots, read = await registry_roots(
                tracker.registry, registry, repository, digest, authorization, state.chunk_size,
                [plan[index] for index, _ in suspects],
            )  # fmt: skip
        except RegistryUnavailable as exc:
            raise ApiError(errors.UNAVAILABLE, str(exc)) from None
        tracker.metrics.verify_bytes.inc(read)
        verdicts = {i: (t.info_hash, pieces_root(t.metainfo) == roots[i]) for i, t in suspects}
        withdrawn = await _update(tracker, digest, lambda s: apply_verdicts(s, verdicts))
    torrents = dict(suspects)
    for index in withdrawn:
        publisher = _who(torrents[index].publisher)
        tracker.metrics.withdrawn.inc()
        logger.warning(
            "chunk %d of %s did not match the registry: withdrawn, %s barred from it",
            index, digest, publisher["node"],
            extra={"event": "withdrawn", **publisher, "digest": str(digest), "chunk": index,
                   "reporter": str(reporter.node), "reporter_key": reporter.key},
        )  # fmt: skip
    if withdrawn:
        tracker.events.notify(digest)
    else:
        logger.warning(
            "false report by %s: every published chunk of %s matches the registry", reporter.node, digest,
            extra={"event": "false_report", **_who(reporter), "digest": str(digest)},
        )  # fmt: skip
    return withdrawn


async def _authorize(
    tracker: Tracker,
    registry: RegistryConfig,
    repository: Repository,
    digest: Digest,
    authorization: str | None,
) -> Grant:
    try:
        return await tracker.authorizer.authorize(registry, repository, digest, authorization)
    except RegistryUnavailable as exc:
        raise ApiError(errors.UNAVAILABLE, str(exc)) from None


def _refusal(denied: Denied) -> ApiError:
    code = {400: errors.BAD_REQUEST, 401: errors.UNAUTHORIZED}.get(denied.status, errors.DENIED)
    return ApiError(code, denied.message)


def _key_member(tracker: Tracker, key: str, digest: Digest) -> Member:
    """The member an announce key for the blob's swarm was given to, or 403."""
    try:
        return tracker.keys.verify(key, digest.swarm_id, time.time())
    except ValueError as exc:
        raise ApiError(errors.DENIED, str(exc)) from None


async def _update(tracker: Tracker, digest: Digest, change: Change[T]) -> T:
    """Apply a state change, translating the swarm's refusals into API errors."""
    try:
        return await tracker.update_blob(digest, change)
    except LeaseLost as exc:
        raise ApiError(errors.CONFLICT, str(exc)) from None
    except ValueError as exc:
        raise ApiError(errors.BAD_REQUEST, str(exc)) from None


def _who(member: Member | str) -> dict[str, str]:
    """A member's log fields: the node id it named and its key, which tells apart two members
    that name one node."""
    node, _, key = str(member).partition("~")
    return {"node": node, "key": key}


def _chunks(state: BlobState, indices: list[int]) -> list[dict[str, Any]]:
    published = dict(state.published())
    return [
        {
            "index": index,
            "torrent": base64.b64encode(published[index].metainfo).decode(),
            "info_hash": published[index].info_hash,
        }
        for index in indices
    ]


def _leases(leases: list[tuple[int, Lease]], seconds: int) -> list[dict[str, Any]]:
    return [{"index": index, "token": lease.token, "seconds": seconds} for index, lease in leases]


def _token() -> str:
    return secrets.token_urlsafe(24)


async def announce(request: web.Request) -> web.Response:
    tracker = request.app[TRACKER]
    now = time.time()
    try:
        query = parse_announce(request.query_string)
        member = tracker.keys.verify(query.key, query.info_hash, now)
    except ValueError as exc:
        tracker.metrics.announce_failures.inc()
        return web.Response(body=encode_failure(str(exc)), content_type=BENCODE)
    config = tracker.config
    interval = config.announce_interval
    # The address the announce came from: an `ip` parameter would let one node list another.
    peer = Peer(
        str(member), request.remote or "", query.port, query.left == 0, now + 2 * interval + 5, query.uploaded
    )
    view = await tracker.store.announce(
        query.info_hash, peer, query.event == "stopped", query.numwant, config.peers_per_address, now
    )
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


def _digest(request: web.Request) -> Digest:
    try:
        return Digest.parse(request.match_info["digest"])
    except ValueError as exc:
        raise ApiError(errors.DIGEST_INVALID, str(exc)) from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object. Its size is checked before parsing, as a megabyte of `[{},…`
    parses into 25 MB of objects. Nesting deeper than the parser's recursion limit is malformed
    input like any other, not an internal error."""
    raw = await request.read()
    if len(raw) > MAX_JSON_BODY:
        raise ApiError(errors.BAD_REQUEST, f"JSON body larger than {MAX_JSON_BODY} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(errors.BAD_REQUEST, "body must be JSON") from None
    except RecursionError:
        raise ApiError(errors.BAD_REQUEST, "JSON body nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(errors.BAD_REQUEST, "body must be a JSON object")
    return body


def _registry_and_repository(tracker: Tracker, body: dict[str, Any]) -> tuple[RegistryConfig, Repository]:
    registry = tracker.config.registry(_string(body, "registry"))
    if registry is None:
        raise ApiError(errors.BAD_REQUEST, f"registry {body['registry']!r} is not served by this tracker")
    try:
        return registry, Repository.parse(_string(body, "repository"))
    except ValueError as exc:
        raise ApiError(errors.BAD_REQUEST, str(exc)) from None


def _known(value: object) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_KNOWN
        or not all(isinstance(v, str) and _INFO_HASH_HEX.fullmatch(v) for v in value)
    ):
        raise ApiError(errors.BAD_REQUEST, "known must be a list of info hashes in lowercase hex")
    return value


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(errors.BAD_REQUEST, f"{name} must be a non-empty string")
    return value
