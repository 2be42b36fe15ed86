"""Token verification rules with locally made keys; tests/tracker proves them against the registry."""

import base64
import datetime as dt
import logging
import time
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from common.certs import (
    CertificateAuthority,
    PrivateKey,
    issue_peer_cert,
    load_csr,
    make_csr,
    new_ca,
    new_key,
)
from common.ids import Digest, NodeId, Repository
from common.tokens import InvalidToken, NoAccess, TokenVerifier, libtrust_key_id
from tests.common.test_certs import key_usage

REPO = Repository.parse("team/app")


def der_b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "iss": "issuer", "aud": "registry", "sub": "alice", "exp": now + 300, "nbf": now - 1, "iat": now,
        "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}],
    }  # fmt: skip
    return base | overrides


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    return new_ca("token root")


def verifier(root: CertificateAuthority) -> TokenVerifier:
    return TokenVerifier.from_bundle(root.cert_pem, "issuer", "registry")


def test_kid_token(root: CertificateAuthority) -> None:
    token = jwt.encode(claims(), root.key, "ES256", headers={"kid": libtrust_key_id(root.cert)})
    assert verifier(root).verify(token, REPO).subject == "alice"


def test_x5c_chain_through_a_signed_leaf(root: CertificateAuthority) -> None:
    leaf_key = new_key()
    leaf = issue_peer_cert(root, load_csr(make_csr(leaf_key)), Digest.parse("sha256:" + "0" * 64),
                           NodeId.parse("signer"), dt.timedelta(hours=1))  # fmt: skip
    token = jwt.encode(claims(), leaf_key, "ES256", headers={"x5c": [der_b64(leaf), der_b64(root.cert)]})
    assert verifier(root).verify(token, REPO).subject == "alice"
    other = new_ca("stranger")
    forged = jwt.encode(claims(), other.key, "ES256", headers={"x5c": [der_b64(other.cert)]})
    with pytest.raises(InvalidToken):
        verifier(root).verify(forged, REPO)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"exp": int(time.time()) - 31}, InvalidToken),
        ({"nbf": int(time.time()) + 120}, InvalidToken),
        ({"aud": "elsewhere"}, InvalidToken),
        ({"aud": ["registry"]}, InvalidToken),
        ({"iss": "mallory"}, InvalidToken),
        ({"access": [{"type": "repository", "name": "team/app", "actions": ["push"]}]}, NoAccess),
        ({"access": [{"type": "repository", "name": "team/other", "actions": ["pull"]}]}, NoAccess),
        ({"access": "everything"}, NoAccess),
    ],
)
def test_refusals(root: CertificateAuthority, overrides: dict[str, object], error: type[Exception]) -> None:
    token = jwt.encode(claims(**overrides), root.key, "ES256", headers={"kid": libtrust_key_id(root.cert)})
    with pytest.raises(error):
        verifier(root).verify(token, REPO)


def test_exp_within_leeway_is_accepted(root: CertificateAuthority) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 20), root.key, "ES256",
                       headers={"kid": libtrust_key_id(root.cert)})  # fmt: skip
    verifier(root).verify(token, REPO)


def test_wildcard_action_and_algorithm_allowlist(root: CertificateAuthority) -> None:
    star = claims(access=[{"type": "repository", "name": "team/app", "actions": ["*"]}])
    kid = {"kid": libtrust_key_id(root.cert)}
    verifier(root).verify(jwt.encode(star, root.key, "ES256", headers=kid), REPO)
    with pytest.raises(InvalidToken):
        verifier(root).verify(jwt.encode(claims(), "secret-" * 5, "HS256", headers=kid), REPO)
    with pytest.raises(InvalidToken):
        verifier(root).verify("not.a.jwt", REPO)


def certificate(
    name: str, key: PrivateKey, issuer: x509.Name | None = None, issuer_key: PrivateKey | None = None, *,
    ca: bool | None = None, path_length: int | None = None, usage: x509.KeyUsage | None = None,
    expired: bool = False,
) -> x509.Certificate:  # fmt: skip
    """A certificate with only the extensions asked for; self-signed without an issuer."""
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=2))
        .not_valid_after(now + dt.timedelta(hours=-1 if expired else 1))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca, path_length), critical=True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


def chain(specs: list[dict[str, Any]]) -> tuple[list[x509.Certificate], PrivateKey]:
    """One certificate per spec, from a self-signed root to the leaf, each issued by the one
    before; and the leaf's key."""
    certs: list[x509.Certificate] = []
    keys: list[PrivateKey] = []
    for spec in specs:
        key = new_key()
        issuer = (certs[-1].subject, keys[-1]) if certs else (None, None)
        certs.append(certificate(f"cert {len(certs)}", key, *issuer, **spec))
        keys.append(key)
    return certs, keys[-1]


CA_CERT: dict[str, Any] = {"ca": True, "usage": key_usage(key_cert_sign=True, crl_sign=True)}
SIGNER: dict[str, Any] = {}
EXPIRED = "not valid at validation time"
PATH_LENGTH = "path length constraint violated"


@pytest.mark.parametrize(
    ("specs", "refusal"),
    [
        pytest.param([CA_CERT, CA_CERT, SIGNER], None, id="leaf-intermediate-root"),
        pytest.param([{"ca": True}], None, id="self-signed-bundle-cert-without-key-usage"),
        pytest.param([{"ca": True}, {"ca": True}, SIGNER], None, id="issuers-without-key-usage"),
        pytest.param([CA_CERT, CA_CERT | {"path_length": 1}, CA_CERT, SIGNER], None, id="path-length-kept"),
        pytest.param([CA_CERT, CA_CERT | {"expired": True}, SIGNER], EXPIRED, id="expired-intermediate"),
        pytest.param([CA_CERT, SIGNER | {"expired": True}], EXPIRED, id="expired-signer"),
        pytest.param([CA_CERT | {"expired": True}, SIGNER], EXPIRED, id="expired-root"),
        pytest.param([CA_CERT, {"usage": CA_CERT["usage"]}, SIGNER], "no basicConstraints",
                     id="issuer-without-basic-constraints"),
        pytest.param([CA_CERT, CA_CERT | {"ca": False}, SIGNER], "cA must be asserted", id="issuer-not-a-ca"),
        pytest.param([CA_CERT | {"path_length": 0}, CA_CERT, SIGNER], PATH_LENGTH,
                     id="root-path-length-exceeded"),
        pytest.param([CA_CERT, CA_CERT | {"path_length": 0}, CA_CERT, SIGNER], PATH_LENGTH,
                     id="intermediate-path-length-exceeded"),
        pytest.param([CA_CERT, CA_CERT | {"usage": key_usage(digital_signature=True)}, SIGNER],
                     "lacks keyCertSign", id="issuer-key-usage-without-key-cert-sign"),
    ],
)  # fmt: skip
def test_x5c_chains(
    specs: list[dict[str, Any]], refusal: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Chains to the bundle's root, which it holds as the registry's `rootcertbundle`; a refusal
    is logged with its reason."""
    certs, key = chain(specs)
    token = jwt.encode(claims(), key, "ES256", headers={"x5c": [der_b64(c) for c in reversed(certs)]})
    check(TokenVerifier([certs[0]], "issuer", "registry"), token, refusal, caplog)


@pytest.mark.parametrize(("exponent", "refusal"), [(65537, None), (3, "exponent 3")])
def test_rsa_signing_keys_need_exponent_65537(
    exponent: int, refusal: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    key = rsa.generate_private_key(exponent, 2048)
    cert = certificate("rsa signer", key, ca=True)
    token = jwt.encode(claims(), key, "RS256", headers={"kid": libtrust_key_id(cert)})
    check(TokenVerifier([cert], "issuer", "registry"), token, refusal, caplog)


def check(tokens: TokenVerifier, token: str, refusal: str | None, caplog: pytest.LogCaptureFixture) -> None:
    """The token is accepted, or refused with `refusal` in the reason logged."""
    if refusal is None:
        assert tokens.verify(token, REPO).subject == "alice"
        return
    caplog.set_level(logging.INFO, "common.tokens")
    with pytest.raises(InvalidToken):
        tokens.verify(token, REPO)
    assert refusal in caplog.text
