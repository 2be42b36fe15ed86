"""Verification of the registry's own bearer tokens, exactly as distribution checks them.

A token is accepted when its signature verifies with a key the registry trusts (header `kid` naming
a certificate of the registry's `rootcertbundle` by libtrust fingerprint, or an `x5c` chain ending
at one), its algorithm is allowlisted, `iss` and `aud` match the registry's configuration, it is
inside `nbf`..`exp` with a small leeway, and it grants the asked action on the repository.
The precise reason for a refusal is logged; callers learn only which kind of refusal it was.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from common.certs import check_rsa_key
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


def _issuer_key_usage(policy: Policy, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    """RFC 5280 6.1.4 (n): an issuer's keyUsage, when present, must allow keyCertSign. The web PKI
    defaults demand the extension; Go's crypto/x509 does not, and neither do root certificates
    made with openssl's default `v3_ca` or the lab's token issuer."""
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("issuer keyUsage lacks keyCertSign")


# Issuers (trusted roots included) get the web PKI rules: basicConstraints critical with cA, pathLen,
# validity, RSA >= 2048 and modern signature algorithms; keyUsage as `_issuer_key_usage` says.
# That is stricter than Go only where RFC 5280 says MUST (a critical basicConstraints, keyCertSign).
# The signing certificate gets no extension rules: distribution verifies x5c with Go's
# crypto/x509 and ExtKeyUsageAny, so a registry's token certificate needs no EKU, SAN or AKI, and
# is often a self-signed CA certificate from the bundle itself. Its validity is still checked.
_ISSUER_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.KeyUsage, Criticality.AGNOSTIC, _issuer_key_usage
)
_SIGNER_POLICY = ExtensionPolicy.permit_all()


class TokenVerifier:
    def __init__(self, trusted: Sequence[x509.Certificate], issuer: str, service: str):
        if not trusted:
            raise ValueError("no token signing certificates")
        self._chains = (
            PolicyBuilder()
            .store(Store(list(trusted)))
            .extension_policies(ca_policy=_ISSUER_POLICY, ee_policy=_SIGNER_POLICY)
        )  # each build_client_verifier() takes the time of that call
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
            if isinstance(key, rsa.RSAPublicKey):
                check_rsa_key(key)  # PyJWT only warns about a short key, and takes any exponent
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
        try:
            self._chains.build_client_verifier().verify(chain[0], chain[1:])
        except VerificationError as exc:
            raise InvalidToken(f"x5c chain refused: {exc}") from None
        return chain[0]


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
