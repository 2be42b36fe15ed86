"""The node's own CA: made at start, kept in memory; leaf certificates for registry hosts.

dockerd trusts the CA only for the registry hosts whose certs.d directory holds it, so the node
can impersonate exactly those registries to the local dockerd and nothing else. The private keys
never touch a disk: a leaf is loaded into its `ssl.SSLContext` through an anonymous memory file.
A CA certificate left behind by a crash is harmless: its key died with the process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import ssl
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.certs import CertificateAuthority, cert_pem, issue_server_cert, new_ca, now
from proxy.routing import certs_dir_names

logger = logging.getLogger(__name__)

CA_FILE = "shoal-node-ca.crt"
# A node runs for months; leaves are reissued from memory when they near the end, so a short
# lifetime costs nothing and limits what a leaked leaf could do.
LEAF_LIFETIME = dt.timedelta(days=7)
LEAF_RENEW_BEFORE = dt.timedelta(days=1)
LEAF_CACHE_SIZE = 256  # only configured registries are intercepted; this bounds the map anyway


def node_ca(node_id: str) -> CertificateAuthority:
    return new_ca(f"shoal-node {node_id} local proxy CA")


def issue_leaf(ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, bytes]:
    """A server certificate for one registry host (DNS name or IP literal), and its PEM key."""
    return issue_server_cert(ca, [name], LEAF_LIFETIME)


def server_context(chain_pem: bytes) -> ssl.SSLContext:
    """A TLS server context from an in-memory PEM (key + certificates), via a memfd."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # Go would otherwise try h2, which we do not speak
    fd = os.memfd_create("shoal-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


@dataclass
class _Leaf:
    context: ssl.SSLContext
    renew_at: dt.datetime


class LeafContexts:
    """TLS server contexts per host name, issued on first use and cached (LRU, bounded).

    dockerd opens a new connection, so a new handshake, for every request: the context and its
    certificate must be ready, not issued per connection.
    """

    def __init__(self, ca: CertificateAuthority, size: int = LEAF_CACHE_SIZE) -> None:
        self.ca = ca
        self._size = size
        self._cache: OrderedDict[str, _Leaf] = OrderedDict()

    def context(self, name: str) -> ssl.SSLContext:
        leaf = self._cache.get(name)
        if leaf is None or now() >= leaf.renew_at:
            cert, key = issue_leaf(self.ca, name)
            leaf = _Leaf(server_context(key + cert_pem(cert)), cert.not_valid_after_utc - LEAF_RENEW_BEFORE)
            self._cache[name] = leaf
            logger.debug("issued leaf certificate", extra={"host_name": name})
        self._cache.move_to_end(name)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return leaf.context


def _write_atomic(path: Path, data: bytes) -> None:
    """dockerd reads certs.d on every pull: it must never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


@contextlib.contextmanager
def ca_files(ca: CertificateAuthority, certs_dir: Path, hosts: list[str]) -> Iterator[list[Path]]:
    """Write the CA certificate into each registry's certs.d directory; remove it on exit.

    Only `shoal-node-ca.crt` is ours: an operator's `ca.crt` or client certificates beside it are
    never touched. Directories this created are removed again when left empty.
    """
    written: list[Path] = []
    created: list[Path] = []
    try:
        for host in hosts:
            for dirname in certs_dir_names(host):
                directory = certs_dir / dirname
                if not directory.is_dir():
                    directory.mkdir(parents=True)
                    created.append(directory)
                path = directory / CA_FILE
                _write_atomic(path, ca.cert_pem)
                written.append(path)
        logger.info("node CA written", extra={"files": [str(p) for p in written]})
        yield written
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):  # not empty: someone else put a file there
                directory.rmdir()
        logger.info("node CA removed", extra={"files": [str(p) for p in written]})
