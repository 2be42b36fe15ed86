"""What the proxy does with a connection and with a request: pure decisions, no sockets.

The listener reads a request head and asks `decide_connection`; the HTTP server inside an
intercepted connection asks `classify` which kind of registry request it holds. Everything that
depends on untrusted bytes is decided here, so it is tested table-driven without a network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from common.ids import Digest, Repository
from proxy.config import NodeConfig, NodeRegistry, is_loopback, split_host_port

MAX_HEAD = 16 * 1024  # a proxy request head (request line + headers); dockerd's are < 1 KiB

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded. Lowercase.
HOP_BY_HOP = frozenset(
    {
        "connection", "proxy-connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2
_VERSION = re.compile(r"HTTP/1\.[01]")
# distribution's routes (registry/api/v2/routes.go): the repository is everything before the
# last /manifests/ or /blobs/; "/blobs/uploads/" is the upload API, not a blob.
_BLOB = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>[^/]+)")
_MANIFEST = re.compile(r"/v2/(?P<repo>.+)/manifests/(?P<reference>[^/]+)")


class BadRequest(ValueError):
    """The client sent something that is not a request this proxy serves (answered with 400)."""


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]


def parse_head(raw: bytes) -> Head:
    """Request line and header fields of an HTTP/1.x head ending in CRLF CRLF (RFC 9112)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not target or not _VERSION.fullmatch(version):
        raise BadRequest("malformed request line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequest("malformed header field")
        headers.append((name, value.strip(" \t")))
    return Head(method, target, version, tuple(headers))


class Action(Enum):
    INTERCEPT = "intercept"  # CONNECT to a configured registry: terminate TLS, serve inside
    TUNNEL = "tunnel"  # CONNECT elsewhere: bytes both ways, never decrypted
    PLAIN = "plain"  # absolute-URI request to a registry configured insecure
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    host: str = ""  # lowercase "host:port" of the target
    registry: NodeRegistry | None = None
    status: int = 0  # for REJECT: 400 or 403
    message: str = ""


def _reject(status: int, message: str) -> Decision:
    return Decision(Action.REJECT, status=status, message=message)


def decide_connection(head: Head, config: NodeConfig) -> Decision:
    """Intercept, tunnel, serve in plain HTTP, or reject a proxy connection by its first request."""
    if head.method == "CONNECT":
        try:
            name, port = split_host_port(head.target)  # RFC 9110 section 9.3.6: authority-form
        except ValueError:
            return _reject(400, "CONNECT target must be host:port")
        host = f"{name}:{port}"
        registry = config.registry(host)
        if registry is None:
            return Decision(Action.TUNNEL, host)
        return Decision(Action.INTERCEPT, host, registry)
    url = urlsplit(head.target)
    if url.scheme != "http" or not url.hostname:
        return _reject(400, "not a proxy request: expected CONNECT or an absolute http:// URI")
    try:
        port = url.port or 80
    except ValueError:
        return _reject(400, "bad port in request URI")
    host = f"[{url.hostname}]:{port}" if ":" in url.hostname else f"{url.hostname}:{port}"
    registry = config.registry(host)
    if registry is None or not registry.insecure:
        return _reject(403, f"plain HTTP is proxied only to registries configured insecure, not {host}")
    return Decision(Action.PLAIN, host, registry)


def client_allowed(peername: object) -> bool:
    """Only loopback clients: the node trusts whoever connects with dockerd's credentials."""
    return isinstance(peername, tuple) and len(peername) >= 2 and is_loopback(str(peername[0]))


class Kind(Enum):
    BLOB = "blob"
    MANIFEST = "manifest"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class RegistryRequest:
    kind: Kind
    repository: Repository | None = None
    digest: Digest | None = None


OTHER = RegistryRequest(Kind.OTHER)


def classify(method: str, path: str) -> RegistryRequest:
    """A blob fetch (GET/HEAD by sha256 digest), a manifest request, or anything else.

    `path` is the request path without the query string. Anything that does not parse as a
    repository and digest is OTHER and goes to the registry unchanged, which answers it.
    """
    if match := _BLOB.fullmatch(path):
        if method not in ("GET", "HEAD") or match["repo"].endswith("/blobs"):
            return OTHER
        try:
            return RegistryRequest(Kind.BLOB, Repository.parse(match["repo"]), Digest.parse(match["digest"]))
        except ValueError:
            return OTHER
    if match := _MANIFEST.fullmatch(path):
        try:
            return RegistryRequest(Kind.MANIFEST, Repository.parse(match["repo"]))
        except ValueError:
            return OTHER
    return OTHER


def forward_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """End-to-end headers only: hop-by-hop ones and those a Connection header names are dropped."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [(name, value) for name, value in pairs if name.lower() not in HOP_BY_HOP | named]


def without(headers: Iterable[tuple[str, str]], *names: str) -> list[tuple[str, str]]:
    drop = {n.lower() for n in names}
    return [(name, value) for name, value in headers if name.lower() not in drop]


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def certs_dir_names(host: str) -> list[str]:
    """The certs.d directories dockerd reads for registry `host:port`.

    dockerd names the directory after the registry as the image reference spells it; a reference
    without a port means 443, so a registry on 443 is looked up under its bare name as well.
    """
    name, port = split_host_port(host)
    return [host, name] if port == 443 else [host]
