import base64
import contextlib
import datetime as dt
import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from common.certs import (
    NODE_URI_PREFIX,
    PrivateKey,
    ca_from_pem,
    ca_to_pem,
    cert_pem,
    check_rsa_key,
    issue_peer_cert,
    issue_server_cert,
    key_id,
    key_pem,
    load_csr,
    make_csr,
    new_ca,
    new_key,
)
from common.ids import Digest, NodeId

BLOB = Digest.parse("sha256:" + "b" * 64)
CA = new_ca("test CA")


def test_peer_cert_is_scoped_to_the_blob_and_chains_to_the_ca() -> None:
    ca = new_ca("test CA")
    csr = load_csr(make_csr(new_key()))
    cert = issue_peer_cert(ca, csr, BLOB, NodeId.parse("node-1"), dt.timedelta(hours=6))
    cert.verify_directly_issued_by(ca.cert)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cn == "node-1"
    assert sans.get_values_for_type(x509.DNSName) == [BLOB.torrent_name]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [NODE_URI_PREFIX + "node-1"]
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=5, minutes=59) < lifetime <= dt.timedelta(hours=6)
    assert cert.public_key() == csr.public_key()


def test_key_id_is_the_sha256_of_the_public_key_info() -> None:
    key = new_key()
    csr = load_csr(make_csr(key))
    cert = issue_peer_cert(CA, csr, BLOB, NodeId.parse("node-1"), dt.timedelta(hours=6))
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_id(csr.public_key()) == key_id(cert.public_key()) == hashlib.sha256(der).hexdigest()
    assert key_id(load_csr(make_csr(new_key())).public_key()) != key_id(csr.public_key())


def test_ca_round_trips_through_pem() -> None:
    ca = new_ca("test CA")
    again = ca_from_pem(ca_to_pem(ca))
    assert again.cert == ca.cert and again.key.private_numbers() == ca.key.private_numbers()  # type: ignore[union-attr]


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


RSA_2048 = rsa.generate_private_key(65537, 2048)


@pytest.mark.parametrize(
    ("make_pem", "error"),
    [
        (lambda: csr_for(RSA_2048), None),
        (lambda: csr_for(rsa.generate_private_key(65537, 1024)), "at least 2048"),
        (lambda: csr_for(rsa.generate_private_key(3, 2048)), "exponent 3; only 65537"),
        (lambda: csr_for(ec.generate_private_key(ec.SECP384R1())), "P-256"),
        (lambda: "garbage", "not a PEM"),
        (lambda: corrupt_signature(make_csr(new_key())), "signature"),
    ],
)
def test_csr_checks(make_pem: Callable[[], str], error: str | None) -> None:
    if error is None:
        load_csr(make_pem())
    else:
        with pytest.raises(ValueError, match=error):
            load_csr(make_pem())


@pytest.mark.parametrize(
    ("exponent", "modulus", "error"),
    [
        (65537, RSA_2048.public_key().public_numbers().n, None),
        (3, RSA_2048.public_key().public_numbers().n, "exponent 3"),
        (17, RSA_2048.public_key().public_numbers().n, "exponent 17"),
        (2**255 + 1, RSA_2048.public_key().public_numbers().n, "exponent"),
        (65537, rsa.generate_private_key(65537, 1024).public_key().public_numbers().n, "1024 bits"),
    ],
)
def test_rsa_key_strength(exponent: int, modulus: int, error: str | None) -> None:
    public = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if error is None:
        check_rsa_key(public)
    else:
        with pytest.raises(ValueError, match=error):
            check_rsa_key(public)


def peer_cert(key: PrivateKey) -> x509.Certificate:
    return issue_peer_cert(CA, load_csr(make_csr(key)), BLOB, NodeId.parse("node-1"), dt.timedelta(hours=1))


@pytest.mark.parametrize(
    ("issue", "encipherment"),
    [
        (lambda: peer_cert(new_key()), False),
        (lambda: peer_cert(RSA_2048), True),
        (lambda: issue_server_cert(CA, ["registry.example"], dt.timedelta(hours=1))[0], False),
    ],
)
def test_tls_certs_carry_a_critical_key_usage(
    issue: Callable[[], x509.Certificate], encipherment: bool
) -> None:
    usage = issue().extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment is encipherment
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_agreement)


def key_usage(**bits: bool) -> x509.KeyUsage:
    """A keyUsage with just these bits."""
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{name: bits.get(name, False) for name in names})


ENCIPHER_ONLY = key_usage(key_encipherment=True)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("key", [new_key(), RSA_2048], ids=["ec", "rsa"])
@pytest.mark.parametrize("usage", [None, ENCIPHER_ONLY], ids=["issued", "encipher-only"])
def test_openssl_accepts_peer_certs_both_ways(
    tmp_path: Path, version: ssl.TLSVersion, key: PrivateKey, usage: x509.KeyUsage | None
) -> None:
    """Mutual TLS between two peers as libtorrent does it: the same OpenSSL checks of keyUsage
    against the cipher suite and the TLS client and server purposes. A certificate without
    digitalSignature is the control: OpenSSL must refuse it."""
    server, client = (peer_context(tmp_path, side, key, usage, version) for side in ("server", "client"))
    if usage is None:
        tls_handshake(server, client)
    else:
        with pytest.raises(ssl.SSLError):
            tls_handshake(server, client)


def peer_context(
    tmp_path: Path, side: str, key: PrivateKey, usage: x509.KeyUsage | None, version: ssl.TLSVersion
) -> ssl.SSLContext:
    cert = peer_cert(key) if usage is None else with_key_usage(peer_cert(key), usage)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # libtorrent matches the torrent name itself
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = context.maximum_version = version
    context.load_verify_locations(cadata=CA.cert_pem.decode())
    pem = tmp_path / f"{side}.pem"
    pem.write_bytes(cert_pem(cert) + key_pem(key))
    context.load_cert_chain(pem)
    return context


def with_key_usage(cert: x509.Certificate, usage: x509.KeyUsage) -> x509.Certificate:
    """`cert` issued again by CA, with `usage` for its keyUsage."""
    builder = x509.CertificateBuilder(
        cert.issuer, cert.subject, cert.public_key(), cert.serial_number,
        cert.not_valid_before_utc, cert.not_valid_after_utc,
    )  # fmt: skip
    for extension in cert.extensions:
        value = usage if isinstance(extension.value, x509.KeyUsage) else extension.value
        builder = builder.add_extension(value, extension.critical)
    return builder.sign(CA.key, hashes.SHA256())


def tls_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """Both ends of a handshake over memory, each writing where the other reads, until both have
    finished; a refusal raises SSLError."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    pending = [client.wrap_bio(to_client, to_server), server.wrap_bio(to_server, to_client, server_side=True)]
    for _ in range(4):  # TLS 1.2 takes two round trips
        for end in list(pending):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
                pending.remove(end)
    assert not pending, "the handshake did not finish"


def corrupt_signature(pem: str) -> str:
    """The PEM object with one byte of its trailing signature flipped."""
    lines = pem.strip().splitlines()
    der = bytearray(base64.b64decode("".join(lines[1:-1])))
    der[-5] ^= 0xFF
    return "\n".join([lines[0], base64.b64encode(bytes(der)).decode(), lines[-1]]) + "\n"
