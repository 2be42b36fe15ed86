"""The cluster's swarm CA: created once in `state_dir`, reused across restarts and replicas.

Replicas that share a Redis store must share this file too (copy it, or mount one secret), so
that a certificate from any replica chains to the root certificate inside every torrent.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.certs import CertificateAuthority, ca_from_pem, ca_to_pem, key_pem, new_ca, write_secret

logger = logging.getLogger(__name__)

CA_FILE = "swarm-ca.pem"


def load_or_create_ca(state_dir: Path) -> CertificateAuthority:
    path = state_dir / CA_FILE
    if not path.exists():
        _create(path)
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path} is readable by group or others; chmod 600 it")
    ca = ca_from_pem(path.read_bytes())
    logger.info("swarm CA %s", ca.cert.subject.rfc4514_string())
    return ca


def _create(path: Path) -> None:
    """Write the new CA beside its final name, then link it there: a concurrent replica that
    loses the race loads the winner's CA, and a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    write_secret(temporary, ca_to_pem(new_ca(f"shoal swarm CA {secrets.token_hex(4)}")))
    try:
        os.link(temporary, path)
        logger.info("created swarm CA at %s", path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()


def announce_secret(ca: CertificateAuthority) -> bytes:
    """The HMAC key for announce keys, derived from the CA key so replicas agree on it."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"shoal announce keys").derive(key_pem(ca.key))
