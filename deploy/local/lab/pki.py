"""The lab's CA: every TLS server of a lab or a test (registry, token realm, tracker) has a
certificate from one, made with shoal's own certificate functions (`common.certs`)."""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

from common.certs import CertificateAuthority, cert_pem, issue_server_cert, new_ca, write_secret

REGISTRY_NAME = "registry.shoal.test"
AUTH_NAME = "auth.shoal.test"
LOOPBACK = "127.0.0.1"
# A lab or a test run lasts hours at most; a month leaves room for a lab kept up by hand.
SERVER_CERT_LIFETIME = dt.timedelta(days=30)


@dataclass(frozen=True)
class ServerCert:
    cert: Path  # leaf then chain, PEM
    key: Path


def new_lab_ca() -> CertificateAuthority:
    return new_ca("shoal lab CA")


def write_ca(ca: CertificateAuthority, path: Path) -> Path:
    path.write_bytes(ca.cert_pem)
    return path


def issue_server_files(ca: CertificateAuthority, directory: Path, name: str, *hosts: str) -> ServerCert:
    """Leaf for `hosts` (DNS names or IP literals) written as `<name>.crt` / `<name>.key` (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf, key = issue_server_cert(ca, list(hosts), SERVER_CERT_LIFETIME)
    cert, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    key_path.unlink(missing_ok=True)
    write_secret(key_path, key)
    cert.write_bytes(cert_pem(leaf) + ca.cert_pem)
    return ServerCert(cert=cert, key=key_path)


def server_context(tls: ServerCert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    return context
