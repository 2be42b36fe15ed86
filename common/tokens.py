"""Verification of the registry's own bearer tokens, exactly as distribution checks them.

A token is accepted when its signature verifies with a key the registry trusts (header `kid` naming
a certificate of the registry's `rootcertbundle` by libtrust fingerprint, or an `x5c` chain ending
at one), its algorithm is allowlisted, `iss` and `aud` match the registry's configuration, it is
inside `nbf`..`exp` with a small leeway, and it grants the asked action on the repository.
The precise reason for a refusal is logged; callers learn only which kind of refusal it was.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from common.ids import Repository

logger = logging.getLogger(__name__)

ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512")
# The issue asks for at most 30 s; distribution allows 60 s, so anything we accept it accepts too.
LEEWAY_SECONDS = 30


class InvalidToken(Exception):
    """The token is not one the registry would accept."""


class NoAccess(Exception):
    """The token is valid but does not grant the action on the repository."""


@dataclass(frozen=True)
class VerifiedToken:
    subject: str
    expires_at: float


def libtrust_key_id(cert: x509.Certificate) -> str:
    """libtrust key id: base32 of the first 240 bits of SHA-256(DER SPKI), in 4-char groups."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


class TokenVerifier:
    def __init__(self, trusted: Sequence[x509.Certificate], issuer: str, service: str):
        if not trusted:
            raise ValueError("no token signing certificates")
        self._trusted = list(trusted)
        self._by_kid = {libtrust_key_id(cert): cert for cert in trusted}
        self._issuer = issuer
        self._service = service

    @classmethod
    def from_bundle(cls, pem: bytes, issuer: str, service: str) -> TokenVerifier:
        return cls(x509.load_pem_x509_certificates(pem), issuer, service)

    def verify(self, token: str, repository: Repository, action: str = "pull") -> VerifiedToken:
        claims = self._verified_claims(token)
        if not _grants(claims.get("access"), str(repository), action):
            logger.info("token of %r grants no %s on %s", claims.get("sub"), action, repository)
            raise NoAccess(f"token does not grant {action} on {repository}")
        return VerifiedToken(subject=str(claims.get("sub", "")), expires_at=float(claims["exp"]))

    def _verified_claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            key = self._signing_cert(header).public_key()
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,  # type: ignore[arg-type]
                algorithms=list(ALGORITHMS),
                audience=self._service,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"], "strict_aud": True},
            )
        except (jwt.PyJWTError, InvalidToken, ValueError) as exc:
            logger.info("invalid registry token: %s", exc)
            raise InvalidToken("invalid token") from None
        return claims

    def _signing_cert(self, header: dict[str, Any]) -> x509.Certificate:
        if header.get("alg") not in ALGORITHMS:
            raise InvalidToken(f"algorithm {header.get('alg')!r} not allowed")
        if "x5c" in header:
            return self._verify_chain(header["x5c"])
        kid = header.get("kid")
        if kid not in self._by_kid:
            raise InvalidToken(f"unknown kid {str(kid)[:64]!r}")
        return self._by_kid[kid]

    def _verify_chain(self, x5c: Any) -> x509.Certificate:
        """The x5c leaf, once its chain (leaf first) ends at a trusted certificate."""
        if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
            raise InvalidToken("x5c must be a non-empty list of base64 certificates")
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c]
        except ValueError as exc:
            raise InvalidToken(f"x5c certificate unreadable: {exc}") from None
        now = dt.datetime.now(dt.UTC)
        for cert in chain:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise InvalidToken("x5c certificate outside its validity period")
        for child, parent in itertools.pairwise(chain):
            _check_issued_by(child, parent)
        top = chain[-1]
        if top in self._trusted:
            return chain[0]
        for root in self._trusted:
            try:
                _check_issued_by(top, root)
            except InvalidToken:
                continue
            return chain[0]
        raise InvalidToken("x5c chain does not end at a trusted token certificate")


def _check_issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        constraints = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise InvalidToken("x5c issuer is not a CA certificate") from None
    if not constraints.ca:
        raise InvalidToken("x5c issuer is not a CA certificate")
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidToken("x5c certificate not signed by the next in chain") from None


def _grants(access: Any, repository: str, action: str) -> bool:
    if not isinstance(access, list):
        return False
    for entry in access:
        if not isinstance(entry, dict):
            continue
        if entry.get("type") != "repository" or entry.get("name") != repository:
            continue
        actions = entry.get("actions")
        if isinstance(actions, list) and (action in actions or "*" in actions):
            return True
    return False
