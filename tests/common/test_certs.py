import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from common.certs import (
    NODE_URI_PREFIX,
    ca_from_pem,
    ca_to_pem,
    issue_peer_cert,
    load_csr,
    make_csr,
    new_ca,
    new_key,
)
from common.ids import Digest, NodeId

BLOB = Digest.parse("sha256:" + "b" * 64)


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


def test_ca_round_trips_through_pem() -> None:
    ca = new_ca("test CA")
    again = ca_from_pem(ca_to_pem(ca))
    assert again.cert == ca.cert and again.key.private_numbers() == ca.key.private_numbers()  # type: ignore[union-attr]


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_csr_checks() -> None:
    load_csr(csr_for(rsa.generate_private_key(65537, 2048)))
    with pytest.raises(ValueError, match="at least 2048"):
        load_csr(csr_for(rsa.generate_private_key(65537, 1024)))
    with pytest.raises(ValueError, match="P-256"):
        load_csr(csr_for(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(ValueError, match="not a PEM"):
        load_csr("garbage")
    with pytest.raises(ValueError, match="signature"):
        load_csr(corrupt_signature(make_csr(new_key())))


def corrupt_signature(pem: str) -> str:
    """The PEM object with one byte of its trailing signature flipped."""
    lines = pem.strip().splitlines()
    der = bytearray(base64.b64decode("".join(lines[1:-1])))
    der[-5] ^= 0xFF
    return "\n".join([lines[0], base64.b64encode(bytes(der)).decode(), lines[-1]]) + "\n"
