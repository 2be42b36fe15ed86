"""The test CA: every TLS server the tests start (registry, token realm) has a cert from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

REGISTRY_NAME = "registry.shoal.test"
AUTH_NAME = "auth.shoal.test"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerCert:
    cert: Path  # leaf then chain, PEM
    key: Path


def new_ca() -> trustme.CA:
    # EC P-256 keys: cheap handshakes, same as the node's own certificates.
    return trustme.CA(key_type=trustme.KeyType.ECDSA)


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def issue_server_cert(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> ServerCert:
    """Leaf for `hosts` (DNS names or IP literals) written as `<name>.crt` / `<name>.key`."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(*hosts, key_type=trustme.KeyType.ECDSA)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return ServerCert(cert=cert, key=key)
