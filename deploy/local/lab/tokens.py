"""A token issuer whose JWTs CNCF distribution 2.8 accepts (`auth: token`).

distribution finds the signing key either by `kid` (the libtrust fingerprint of a public key in
its `rootcertbundle`) or by an `x5c` chain to a cert in that bundle; see distribution
`registry/auth/token/token.go`. The same issuer also mints the wrong tokens tests need: expired,
not yet valid, wrong audience or issuer, forged (signed by another key).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ISSUER_NAME = "shoal-test-issuer"
SERVICE = "shoal-test-registry"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KeyType = Literal["ec", "rsa"]
Header = Literal["kid", "x5c", "none"]
# {repo: actions} or [(repo, actions), ...]; the list form allows repeated or ordered entries.
Access = Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]]


def new_signing_key(key_type: KeyType = "ec") -> SigningKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def libtrust_kid(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> str:
    """libtrust `keyIDFromCryptoKey`: base32(SHA-256(DER SPKI)[:30]) in groups of 4, ':'-joined."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def default_algorithm(key: SigningKey) -> str:
    return "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"


def self_signed_cert(key: SigningKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def access_entries(access: Access) -> list[dict[str, Any]]:
    items = access.items() if isinstance(access, Mapping) else access
    return [{"type": "repository", "name": repo, "actions": list(actions)} for repo, actions in items]


class TokenIssuer:
    """Owns a signing key and its self-signed cert (the registry's `rootcertbundle`)."""

    def __init__(
        self,
        key: SigningKey | None = None,
        *,
        cert: x509.Certificate | None = None,
        key_type: KeyType = "ec",
        issuer_name: str = ISSUER_NAME,
        service: str = SERVICE,
    ) -> None:
        self.key: SigningKey = key if key is not None else new_signing_key(key_type)
        self.cert = cert if cert is not None else self_signed_cert(self.key, issuer_name)
        self.issuer_name = issuer_name
        self.service = service
        self.kid = libtrust_kid(self.key.public_key())
        self.algorithm = default_algorithm(self.key)

    @classmethod
    def load(cls, key_path: Path, cert_path: Path, *, issuer_name: str, service: str) -> TokenIssuer:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{key_path}: signing key must be EC or RSA")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return cls(key, cert=cert, issuer_name=issuer_name, service=service)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_bundle(self, path: Path) -> Path:
        """The PEM file the registry (and the tracker) use as `rootcertbundle`."""
        path.write_bytes(self.cert_pem)
        return path

    def write_key(self, path: Path) -> Path:
        path.touch(mode=0o600)
        path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def token(
        self,
        access: Access,
        *,
        subject: str = "tester",
        expires_in: int = 300,
        not_before_offset: int = 0,
        audience: str | None = None,
        issuer: str | None = None,
        header: Header = "kid",
        key: SigningKey | None = None,
        algorithm: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed JWT. `key` signs with another key while naming ours (a forgery);
        `extra_claims` overrides or adds claims (e.g. `{"aud": [...]}`)."""
        signer = key if key is not None else self.key
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer if issuer is not None else self.issuer_name,
            "sub": subject,
            "aud": audience if audience is not None else self.service,
            "exp": now + expires_in,
            "nbf": now + not_before_offset,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access_entries(access),
        }
        claims.update(extra_claims or {})
        headers: dict[str, Any] = {}
        if header == "kid":
            headers["kid"] = self.kid
        elif header == "x5c":
            der = self.cert.public_bytes(serialization.Encoding.DER)
            headers["x5c"] = [base64.b64encode(der).decode()]
        return jwt.encode(claims, signer, algorithm=algorithm or default_algorithm(signer), headers=headers)
