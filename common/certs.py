"""Certificates as plain functions: CA creation, CSR checks, blob-scoped peer certificates, server
certificates for named hosts.

Keys are EC P-256 unless a CSR brings an RSA key: cheap handshakes matter because every peer
connection is a TLS handshake. Private keys never leave memory except through `write_secret`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.ids import Digest, NodeId

# Clocks in a cluster drift by seconds, not minutes; backdating by five minutes keeps a freshly
# issued certificate valid on a peer whose clock runs a little behind.
BACKDATE = dt.timedelta(minutes=5)
CA_LIFETIME = dt.timedelta(days=3650)
MIN_RSA_BITS = 2048
# The exponent every key generator uses, so the only one allowed. A small one (e = 3) lets a
# signature be forged for any verifier that checks PKCS #1 v1.5 padding loosely (Bleichenbacher
# 2006; again in NSS in 2014 and python-rsa in 2016); a huge one makes every verification slow.
RSA_EXPONENT = 65537
NODE_URI_PREFIX = "urn:shoal:node:"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_ca(common_name: str) -> CertificateAuthority:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issued = now() - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued)
        .not_valid_after(issued + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return CertificateAuthority(cert, key)


def check_rsa_key(public: rsa.RSAPublicKey) -> None:
    """Refuse an RSA key that is short enough to factor or has an exponent other than 65537."""
    if public.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {public.key_size} bits; at least {MIN_RSA_BITS}")
    exponent = public.public_numbers().e
    if exponent != RSA_EXPONENT:
        raise ValueError(f"RSA public exponent {exponent}; only {RSA_EXPONENT} is allowed")


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse a CSR and check it: valid self-signature, EC P-256 or RSA >= 2048 bits with e = 65537."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError:
        raise ValueError("csr is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise ValueError("csr signature does not verify")
    public = csr.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1):
            raise ValueError(f"csr key curve {public.curve.name} not allowed; use P-256")
    elif isinstance(public, rsa.RSAPublicKey):
        check_rsa_key(public)
    else:
        raise ValueError("csr key must be EC P-256 or RSA")
    return csr


def key_id(public: CertificatePublicKeyTypes) -> str:
    """Hex SHA-256 of the key's DER SubjectPublicKeyInfo: what the tracker knows a joiner by, as
    only the key's holder can sign a CSR for it (a node id is a name anyone may give)."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def make_csr(key: PrivateKey) -> str:
    """A CSR that carries only the public key: the tracker sets every name itself."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def issue_peer_cert(
    ca: CertificateAuthority,
    csr: x509.CertificateSigningRequest,
    blob: Digest,
    node: NodeId,
    lifetime: dt.timedelta,
) -> x509.Certificate:
    """A certificate that opens exactly one blob's swarm.

    libtorrent admits a peer whose certificate chains to the torrent's root certificate and whose
    CN or a DNS SAN equals the torrent name (`*` matching all). The only DNS SAN is the torrent
    name; the CN is the node id, which can never equal a torrent name: node ids have at most 64
    characters, torrent names 71 (and X.509 caps a CN at 64, so it could not hold one anyway).
    The node id is also in a URI SAN, which libtorrent never matches. Only the CSR's public key
    is used; every name is set here.
    """
    issued = now() - BACKDATE
    torrent = blob.torrent_name
    public = csr.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(node))]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued)
        .not_valid_after(issued + BACKDATE + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(torrent), x509.UniformResourceIdentifier(NODE_URI_PREFIX + str(node))]
            ),
            critical=False,
        )
        .add_extension(_tls_key_usage(public), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def _tls_key_usage(public: CertificatePublicKeyTypes) -> x509.KeyUsage:
    """What a TLS leaf's key does, and nothing more (RFC 5280 4.2.1.3, critical as RFC 5280 advises).

    digitalSignature: the key signs the handshake (TLS 1.3 CertificateVerify, TLS 1.2 ECDHE key
    exchange). OpenSSL, which libtorrent links, offers no ECDSA cipher suite for a certificate
    without it, and its TLS client purpose wants it (or keyAgreement, which a signing key lacks).
    keyEncipherment only for RSA, the key TLS 1.2's RSA key transport encrypts to (RFC 5246
    7.4.2); an EC key cannot encipher (RFC 5480 3).
    """
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False,
        key_encipherment=isinstance(public, rsa.RSAPublicKey), data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
        decipher_only=False,
    )  # fmt: skip


def issue_server_cert(
    ca: CertificateAuthority, names: list[str], lifetime: dt.timedelta
) -> tuple[x509.Certificate, bytes]:
    """A TLS server certificate for `names` (DNS names or IP literals), and its PEM private key.

    Go's crypto/x509, which dockerd and containerd use, matches only subjectAltName, never the CN.
    """
    key = new_key()
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    issued = now() - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued)
        .not_valid_after(issued + BACKDATE + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(_tls_key_usage(key.public_key()), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key_pem(key)


def write_secret(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the first byte on; refuse to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def ca_to_pem(ca: CertificateAuthority) -> bytes:
    return ca.cert_pem + key_pem(ca.key)


def ca_from_pem(data: bytes) -> CertificateAuthority:
    """A CA from one PEM holding its certificate and its unencrypted private key."""
    cert = x509.load_pem_x509_certificate(data)
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("CA key must be EC or RSA")
    if cert.public_key() != key.public_key():
        raise ValueError("CA key does not match its certificate")
    return CertificateAuthority(cert, key)
