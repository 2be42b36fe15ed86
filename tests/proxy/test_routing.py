"""The proxy's decisions, table-driven, without sockets."""

from __future__ import annotations

import pytest

from common.config import load_config
from common.ids import Digest, Repository
from proxy.config import NodeConfig
from proxy.p2p import parse_range
from proxy.routing import (
    Action,
    BadRequest,
    Kind,
    certs_dir_names,
    classify,
    client_allowed,
    decide_connection,
    forward_headers,
    origin_of,
    parse_head,
    without,
)

HEX = "a" * 64
CONFIG = load_config(
    NodeConfig,
    {
        "node_id": "n1",
        "registries": [
            {"host": "registry.example:5000"},
            {"host": "Plain.Example:5000", "insecure": True},
            {"host": "[fd00::1]:443"},
        ],
    },
)


def head(line: str, *headers: str) -> bytes:
    return "\r\n".join([line, *headers, "", ""]).encode()


@pytest.mark.parametrize(
    ("raw", "action", "host"),
    [
        (head("CONNECT registry.example:5000 HTTP/1.1", "Host: registry.example:5000"), Action.INTERCEPT,
         "registry.example:5000"),
        (head("CONNECT REGISTRY.example:5000 HTTP/1.1"), Action.INTERCEPT, "registry.example:5000"),
        (head("CONNECT [fd00::1]:443 HTTP/1.1"), Action.INTERCEPT, "[fd00::1]:443"),
        (head("CONNECT plain.example:5000 HTTP/1.1"), Action.INTERCEPT, "plain.example:5000"),
        (head("CONNECT registry.example:443 HTTP/1.1"), Action.TUNNEL, "registry.example:443"),
        (head("CONNECT auth.example:443 HTTP/1.0"), Action.TUNNEL, "auth.example:443"),
        (head("GET http://plain.example:5000/v2/ HTTP/1.1"), Action.PLAIN, "plain.example:5000"),
        (head("HEAD http://PLAIN.example:5000/v2/a/blobs/x HTTP/1.1"), Action.PLAIN, "plain.example:5000"),
    ],
)  # fmt: skip
def test_decide_connection(raw: bytes, action: Action, host: str) -> None:
    decision = decide_connection(parse_head(raw), CONFIG)
    assert (decision.action, decision.host) == (action, host)
    if action in (Action.INTERCEPT, Action.PLAIN):
        assert decision.registry is not None and decision.registry.host == host


@pytest.mark.parametrize(
    ("line", "status"),
    [
        ("CONNECT registry.example HTTP/1.1", 400),  # no port
        ("CONNECT registry.example:0 HTTP/1.1", 400),
        ("CONNECT registry.example:99999 HTTP/1.1", 400),
        ("CONNECT :443 HTTP/1.1", 400),
        ("CONNECT registry.example:5000/x HTTP/1.1", 400),
        ("GET /v2/ HTTP/1.1", 400),  # origin-form: not a proxy request
        ("GET https://registry.example:5000/v2/ HTTP/1.1", 400),
        ("GET http://registry.example:5000/v2/ HTTP/1.1", 403),  # TLS registry: never plain HTTP
        ("GET http://elsewhere.example/ HTTP/1.1", 403),  # no open HTTP proxy
        ("GET http://plain.example:5000x/v2/ HTTP/1.1", 400),
    ],
)
def test_rejected_connections(line: str, status: int) -> None:
    decision = decide_connection(parse_head(head(line)), CONFIG)
    assert (decision.action, decision.status) == (Action.REJECT, status)
    assert decision.message


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n",
        "GET /\u00e9 HTTP/1.1\r\n\r\n".encode(),
        b"\r\n\r\n",
    ],
)
def test_parse_head_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_head(raw)


def test_parse_head() -> None:
    parsed = parse_head(head("CONNECT a:1 HTTP/1.1", "Host: a:1", "User-Agent:  Go-http-client/1.1 "))
    assert (parsed.method, parsed.target, parsed.version) == ("CONNECT", "a:1", "HTTP/1.1")
    assert parsed.headers == (("Host", "a:1"), ("User-Agent", "Go-http-client/1.1"))


@pytest.mark.parametrize(
    ("method", "path", "kind", "repo", "digest"),
    [
        ("GET", f"/v2/library/ubuntu/blobs/sha256:{HEX}", Kind.BLOB, "library/ubuntu", HEX),
        ("HEAD", f"/v2/a/blobs/sha256:{HEX}", Kind.BLOB, "a", HEX),
        ("GET", f"/v2/a/b/c/blobs/sha256:{HEX}", Kind.BLOB, "a/b/c", HEX),
        ("DELETE", f"/v2/a/blobs/sha256:{HEX}", Kind.OTHER, None, None),
        ("GET", "/v2/a/blobs/sha256:abc", Kind.OTHER, None, None),  # not a digest we serve
        ("GET", f"/v2/a/blobs/sha512:{HEX}{HEX}", Kind.OTHER, None, None),
        ("GET", f"/v2/A/blobs/sha256:{HEX}", Kind.OTHER, None, None),  # bad repository name
        ("GET", "/v2/a/blobs/uploads/", Kind.OTHER, None, None),
        ("GET", "/v2/a/blobs/uploads/1234-5678", Kind.OTHER, None, None),
        ("PATCH", "/v2/a/blobs/uploads/1234", Kind.OTHER, None, None),
        ("GET", f"/v2/a/blobs/blobs/sha256:{HEX}", Kind.OTHER, None, None),
        ("GET", "/v2/a/manifests/latest", Kind.MANIFEST, "a", None),
        ("HEAD", f"/v2/x/y/manifests/sha256:{HEX}", Kind.MANIFEST, "x/y", None),
        ("PUT", "/v2/a/manifests/v1", Kind.MANIFEST, "a", None),
        ("GET", "/v2/", Kind.OTHER, None, None),
        ("GET", "/v2/a/tags/list", Kind.OTHER, None, None),
        ("GET", "/v2/_catalog", Kind.OTHER, None, None),
        ("GET", "/", Kind.OTHER, None, None),
    ],
)
def test_classify(method: str, path: str, kind: Kind, repo: str | None, digest: str | None) -> None:
    what = classify(method, path)
    assert what.kind is kind
    assert what.repository == (Repository(repo) if repo else None)
    assert what.digest == (Digest(digest) if digest else None)


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        (("127.0.0.1", 5000), True),
        (("127.9.8.7", 5000), True),
        (("::1", 5000, 0, 0), True),
        (("::ffff:127.0.0.1", 5000, 0, 0), False),  # ip_address does not unmap; refusing is the safe side
        (("10.0.0.1", 5000), False),
        (("192.168.1.2", 5000), False),
        (("::", 5000, 0, 0), False),
        (None, False),
        ("/run/sock", False),
    ],
)
def test_client_allowed(peer: object, allowed: bool) -> None:
    assert client_allowed(peer) is allowed


def test_forward_headers_drops_hop_by_hop() -> None:
    headers = [
        ("Host", "r:1"), ("Authorization", "Bearer x"), ("Connection", "keep-alive, X-Private"),
        ("Keep-Alive", "5"), ("Proxy-Authorization", "Basic y"), ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"), ("Upgrade", "h2c"), ("X-Private", "1"), ("Accept", "a"), ("Accept", "b"),
    ]  # fmt: skip
    assert forward_headers(headers) == [
        ("Host", "r:1"), ("Authorization", "Bearer x"), ("Accept", "a"), ("Accept", "b"),
    ]  # fmt: skip
    assert without(headers[:2], "authorization") == [("Host", "r:1")]


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Registry.example/v2/", "https://registry.example:443"),
        ("https://registry.example:443/x?y", "https://registry.example:443"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_origin_of(url: str, origin: str) -> None:
    assert origin_of(url) == origin


def test_certs_dir_names() -> None:
    assert certs_dir_names("registry.example:5000") == ["registry.example:5000"]
    assert certs_dir_names("registry.example:443") == ["registry.example:443", "registry.example"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("bytes=0-", (0, 100)), ("bytes=10-19", (10, 20)), ("bytes=90-500", (90, 100))],
)
def test_ranges_the_node_serves_itself(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(
    "header",
    [
        "bytes=100-", "bytes=5-1", "bytes=-10", "bytes=0-1,5-6", "items=0-1", "bytes=x-",
        "bytes=+1-", "bytes=1_0-",
        # digits of other scripts, which str.isdigit takes: Arabic-Indic, superscript, fullwidth
        "bytes=\u0660-\u0669", "bytes=0-\u0669", "bytes=\u00b2-", "bytes=\uff11-\uff12",
    ],
)  # fmt: skip
def test_other_ranges_are_left_to_the_registry(header: str) -> None:
    with pytest.raises(ValueError):
        parse_range(header, 100)


def test_announce_schedule() -> None:
    from common.ids import Digest
    from proxy.announcer import Schedule

    a, b = Digest("a" * 64), Digest("b" * 64)
    schedule = Schedule()
    assert schedule.pending([a, b], now=0) == [a, b]  # new torrents announce at once
    schedule.answered(a, now=0, interval=30, peers=0, seeding=False)  # hungry leecher: soon again
    schedule.answered(b, now=0, interval=30, peers=0, seeding=True)  # a seeder waits for others
    assert schedule.pending([a, b], now=1) == []
    assert schedule.pending([a, b], now=2) == [a]
    schedule.answered(a, now=2, interval=30, peers=5, seeding=False)
    assert schedule.pending([a, b], now=30) == [b]
    schedule.failed(b, now=30)
    assert schedule.pending([a, b], now=31) == []  # a failure is retried a few seconds later
    assert schedule.pending([a], now=31) == []  # b left the peer: forgotten ...
    assert schedule.pending([a, b], now=31) == [b]  # ... and new again when it comes back
