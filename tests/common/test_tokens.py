"""Token verification rules with locally made keys; tests/tracker proves them against the registry."""

import base64
import datetime as dt
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.certs import CertificateAuthority, issue_peer_cert, load_csr, make_csr, new_ca, new_key
from common.ids import Digest, NodeId, Repository
from common.tokens import InvalidToken, NoAccess, TokenVerifier, libtrust_key_id

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
