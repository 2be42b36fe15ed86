"""The tracker as a process, against a real distribution registry with TLS and token auth."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from lab.images import push_image
from lab.pki import AUTH_NAME, LOOPBACK, REGISTRY_NAME, issue_server_files, new_lab_ca
from lab.registry import Registry
from lab.token_server import TokenServer
from lab.tokens import TokenIssuer

from common import bencoding
from common.certs import CertificateAuthority, make_csr, new_key
from common.ids import Digest, NodeId, Repository
from tests.common.test_certs import corrupt_signature
from tests.conftest import USERS
from tests.tracker.harness import RunningTracker, redis_server, run_tracker, tracker_config
from tests.tracker.torrents import make_metainfo
from tracker.client import JoinAnswer, TrackerClient, TrackerRefused

REPO_A, REPO_B = "team/app-a", "team/app-b"
NODE = NodeId.parse("node-1")


@dataclass
class Lab:
    registry: Registry
    tls_ca: CertificateAuthority
    work: Path
    blob_a: Digest  # only in REPO_A
    blob_b: Digest  # only in REPO_B
    blob_a_bytes: bytes

    def registry_entry(self) -> dict[str, Any]:
        return {
            "host": self.registry.host,
            "url": self.registry.url,
            "ca": str(self.registry.ca_pem),
            "token": {
                "issuer": self.registry.issuer.issuer_name,
                "service": self.registry.issuer.service,
                "certs": str(self.registry.certs_bundle),
            },
        }

    def pull(self, repo: str = REPO_A, **kwargs: Any) -> str:
        return "Bearer " + self.registry.issuer.token({repo: ["pull"]}, **kwargs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    work = tmp_path_factory.mktemp("tracker-lab")
    ca, issuer = new_lab_ca(), TokenIssuer()
    tls = issue_server_files(ca, work / "auth", "auth", AUTH_NAME, REGISTRY_NAME, LOOPBACK)
    async with (
        TokenServer(issuer, tls, USERS) as realm,
        Registry(work / "registry", ca, issuer, realm.realm) as registry,
    ):
        layer_a = b"layer of A " * 40_000
        layer_b = b"layer of B " * 40_000
        image_a = await push_image(registry, REPO_A, [layer_a])
        image_b = await push_image(registry, REPO_B, [layer_b])
        blob_a, blob_b = (Digest.parse(image.layer_digests[0]) for image in (image_a, image_b))
        yield Lab(registry, new_lab_ca(), work, blob_a, blob_b, layer_a)


@pytest_asyncio.fixture(loop_scope="module")
async def tracker(lab: Lab, tmp_path: Path) -> AsyncIterator[RunningTracker]:
    config = tracker_config(tmp_path, lab.tls_ca, [lab.registry_entry()], origin_lease=2)
    async with run_tracker(tmp_path, lab.tls_ca, config) as running:
        yield running


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def join(
    client: TrackerClient, lab: Lab, blob: Digest, authorization: str | None,
    repo: str = REPO_A, node: NodeId = NODE, csr: str | None = None,
) -> JoinAnswer:  # fmt: skip
    return await client.join(
        blob, lab.registry.host, Repository.parse(repo), node, csr or make_csr(new_key()), authorization
    )


async def metric(session: aiohttp.ClientSession, tracker: RunningTracker, name: str) -> float:
    async with session.get(f"{tracker.url}/metrics", ssl=tracker.ssl_context()) as resp:
        text = await resp.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
               (line.startswith(name + "{") and not line.startswith("#")))  # fmt: skip


@pytest.mark.parametrize(
    ("make_auth", "status", "reason"),
    [
        (lambda lab: None, 401, "no_credential"),
        (
            lambda lab: "Bearer " + lab.registry.issuer.token({REPO_A: ["pull"]}, key=new_key()),
            401,
            "invalid_token",
        ),
        (lambda lab: lab.pull(expires_in=-120), 401, "invalid_token"),
        (lambda lab: lab.pull(audience="another-registry"), 401, "invalid_token"),
        (lambda lab: lab.pull(issuer="another-issuer"), 401, "invalid_token"),
        (lambda lab: "Bearer " + lab.registry.issuer.token({REPO_A: ["push"]}), 403, "no_pull_access"),
        (lambda lab: "Bearer not-a-jwt", 401, "invalid_token"),
        (lambda lab: "Basic " + base64.b64encode(b"user:wrong").decode(), 401, "invalid_token"),
    ],
    ids=["none", "forged", "expired", "audience", "issuer", "push-only", "garbage", "basic"],
)
async def test_join_refusals(
    lab: Lab, tracker: RunningTracker, make_auth: Any, status: int, reason: str
) -> None:
    async with tracker.client() as (client, session):
        with pytest.raises(TrackerRefused) as refused:
            await join(client, lab, lab.blob_a, make_auth(lab))
        assert refused.value.status == status
        assert await metric(session, tracker, f'shoal_tracker_join_denied_total{{reason="{reason}"}}') == 1


async def test_token_for_a_does_not_open_a_blob_only_b_holds(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, session):
        with pytest.raises(TrackerRefused) as refused:
            await join(client, lab, lab.blob_b, lab.pull(REPO_A), repo=REPO_A)
        assert refused.value.status == 403
        assert (
            await metric(session, tracker, 'shoal_tracker_join_denied_total{reason="not_in_repository"}') == 1
        )
        # ... while B's own token opens it.
        answer = await join(client, lab, lab.blob_b, lab.pull(REPO_B), repo=REPO_B)
        assert answer.role == "origin"


async def test_valid_join_gets_a_blob_scoped_certificate(lab: Lab, tracker: RunningTracker) -> None:
    key = new_key()
    async with tracker.client() as (client, session):
        answer = await join(client, lab, lab.blob_a, lab.pull(), csr=make_csr(key), repo=REPO_A)
        async with session.get(f"{tracker.url}/v1/ca", ssl=tracker.ssl_context()) as resp:
            ca = x509.load_pem_x509_certificate(await resp.read())
    assert answer.role == "origin" and answer.lease
    assert answer.cert is not None
    cert = x509.load_pem_x509_certificate(answer.cert.encode())
    cert.verify_directly_issued_by(ca)
    assert cert.public_key() == key.public_key()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [lab.blob_a.torrent_name]
    assert "*" not in sans.get_values_for_type(x509.DNSName)
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=5, minutes=58) < lifetime <= dt.timedelta(hours=6)


async def test_malformed_requests_get_400_oci_errors(lab: Lab, tracker: RunningTracker) -> None:
    good = make_csr(new_key())
    bad_sig = corrupt_signature(good)
    async with tracker.client() as (_, session):
        for blob, body in [
            ("sha256:xyz", {}),
            (str(lab.blob_a), "not json"),
            (
                str(lab.blob_a),
                {"registry": lab.registry.host, "repository": REPO_A, "node": "n", "csr": bad_sig},
            ),
            (str(lab.blob_a), {"registry": "elsewhere:5000", "repository": REPO_A, "node": "n", "csr": good}),
            (
                str(lab.blob_a),
                {"registry": lab.registry.host, "repository": "Bad//Repo", "node": "n", "csr": good},
            ),
        ]:
            data = body if isinstance(body, str) else None
            async with session.post(
                f"{tracker.url}/v1/blobs/{blob}/join", ssl=tracker.ssl_context(),
                json=None if data else body, data=data, headers={"Authorization": lab.pull()},
            ) as resp:  # fmt: skip
                payload = await resp.json()
                assert resp.status == 400, (blob, body, payload)
                assert payload["errors"][0]["code"] in ("BAD_REQUEST", "DIGEST_INVALID")


async def announce(
    session: aiohttp.ClientSession, tracker: RunningTracker, url: str | None, info_hash: bytes, port: int,
    left: int = 0,
) -> dict[bytes, Any]:  # fmt: skip
    base = url or f"{tracker.url}/announce?x=1"
    query = f"&info_hash={quote_from_bytes(info_hash)}&port={port}&left={left}&compact=1"
    async with session.get(base + query, ssl=tracker.ssl_context()) as resp:
        return bencoding.decode(await resp.read())  # type: ignore[no-any-return]


async def become_origin_and_publish(client: TrackerClient, lab: Lab, node: NodeId) -> tuple[JoinAnswer, str]:
    origin = await join(client, lab, lab.blob_a, lab.pull(), node=node)
    assert origin.role == "origin" and origin.lease and origin.ca
    metainfo = make_metainfo(lab.blob_a, lab.blob_a_bytes, origin.ca.encode())
    return origin, await client.publish(lab.blob_a, origin.lease, metainfo)


def info_hash_of(answer: JoinAnswer) -> bytes:
    assert answer.torrent is not None
    info = bencoding.decode(answer.torrent)[b"info"]
    return hashlib.sha256(bencoding.encode(info)).digest()[:20]


async def test_publish_then_leechers_and_announce_keys(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, session):
        _, origin_announce = await become_origin_and_publish(client, lab, NodeId.parse("origin"))
        leecher = await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("leecher"))
        assert leecher.role == "leecher" and leecher.announce and leecher.torrent
        info_hash = info_hash_of(leecher)

        seeded = await announce(session, tracker, origin_announce, info_hash, 7001)
        assert b"failure reason" not in seeded
        reply = await announce(session, tracker, leecher.announce, info_hash, 7002, left=100)
        assert reply[b"peers"] == bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")
        assert (reply[b"complete"], reply[b"incomplete"]) == (1, 1)

        no_key = await announce(session, tracker, None, info_hash, 7003)
        assert b"failure reason" in no_key and b"peers" not in no_key
        other_hash = await announce(session, tracker, leecher.announce, b"\x01" * 20, 7003)
        assert b"another torrent" in other_hash[b"failure reason"]

        scrape_url = leecher.announce.replace("/announce?", "/scrape?")
        query = f"&info_hash={quote_from_bytes(info_hash)}&info_hash={quote_from_bytes(b'x' * 20)}"
        async with session.get(scrape_url + query, ssl=tracker.ssl_context()) as resp:
            files = bencoding.decode(await resp.read())[b"files"]
        assert files == {info_hash: {b"complete": 1, b"incomplete": 1, b"downloaded": 0}}


async def test_origin_lease_expires_and_next_joiner_is_promoted(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, _):
        first = await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("first"))
        assert first.role == "origin" and first.lease
        waiting = await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("second"))
        assert waiting.role == "wait" and waiting.retry_after is not None and 0 < waiting.retry_after <= 2
        await client.progress(lab.blob_a, first.lease, 1000)  # progress keeps the lease...
        await asyncio.sleep(1.2)
        await client.progress(lab.blob_a, first.lease, 2000)
        await asyncio.sleep(1.2)
        assert (await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("second"))).role == "wait"
        await asyncio.sleep(2.2)  # ...and silence loses it
        promoted = await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("second"))
        assert promoted.role == "origin"
        with pytest.raises(TrackerRefused) as lost:
            await client.progress(lab.blob_a, first.lease, 3000)
        assert lost.value.status == 409
        with pytest.raises(TrackerRefused):
            await client.publish(lab.blob_a, first.lease, make_metainfo(lab.blob_a, lab.blob_a_bytes, b""))


async def test_publish_checks_lease_and_metainfo(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, _):
        origin = await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("origin"))
        assert origin.lease and origin.ca
        good = make_metainfo(lab.blob_a, lab.blob_a_bytes, origin.ca.encode())
        with pytest.raises(TrackerRefused) as wrong_lease:
            await client.publish(lab.blob_a, "not-the-lease", good)
        assert wrong_lease.value.status == 409
        other_ca = make_metainfo(lab.blob_a, lab.blob_a_bytes, new_lab_ca().cert_pem)
        with pytest.raises(TrackerRefused) as wrong_ca:
            await client.publish(lab.blob_a, origin.lease, other_ca)
        assert wrong_ca.value.status == 400
        await client.publish(lab.blob_a, origin.lease, good)


async def test_report_withdraws_torrent_and_bars_publisher(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, session):
        await become_origin_and_publish(client, lab, NodeId.parse("liar"))
        leecher = await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("honest"))
        assert leecher.role == "leecher" and leecher.announce
        key = leecher.announce.split("shoal_key=")[1]
        with pytest.raises(TrackerRefused) as forged:
            await client.report(lab.blob_a, "digest_mismatch", key[:-2] + "00")
        assert forged.value.status == 403
        await client.report(lab.blob_a, "digest_mismatch", key)
        assert (await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("liar"))).role == "wait"
        assert (await join(client, lab, lab.blob_a, lab.pull(), node=NodeId.parse("honest"))).role == "origin"
        assert await metric(session, tracker, "shoal_tracker_torrents_withdrawn_total") == 1


async def test_restart_keeps_ca_and_torrents(lab: Lab, tmp_path: Path) -> None:
    config = tracker_config(tmp_path, lab.tls_ca, [lab.registry_entry()])
    async with run_tracker(tmp_path, lab.tls_ca, config) as first, first.client() as (client, _):
        await become_origin_and_publish(client, lab, NodeId.parse("origin"))
        ca_before = (await join(client, lab, lab.blob_a, lab.pull())).ca
    assert oct((tmp_path / "tracker-state" / "swarm-ca.pem").stat().st_mode & 0o777) == "0o600"
    async with run_tracker(tmp_path, lab.tls_ca, config) as second, second.client() as (client, _):
        again = await join(client, lab, lab.blob_a, lab.pull())
    assert again.role == "leecher" and again.ca == ca_before


async def test_two_trackers_share_joins_and_peers_through_redis(lab: Lab, tmp_path: Path) -> None:
    with redis_server(tmp_path) as redis_url:
        entry = [lab.registry_entry()]
        config_one = tracker_config(tmp_path, lab.tls_ca, entry, store=redis_url)
        config_two = tracker_config(tmp_path, lab.tls_ca, entry, store=redis_url)
        async with (
            run_tracker(tmp_path, lab.tls_ca, config_one) as one,
            run_tracker(tmp_path, lab.tls_ca, config_two) as two,
            one.client() as (c1, s1),
            two.client() as (c2, s2),
        ):
            first = await join(c1, lab, lab.blob_a, lab.pull(), node=NodeId.parse("a"))
            assert first.role == "origin"
            assert (await join(c2, lab, lab.blob_a, lab.pull(), node=NodeId.parse("b"))).role == "wait"
            _, announce_a = await become_origin_and_publish(c1, lab, NodeId.parse("a"))
            leecher = await join(c2, lab, lab.blob_a, lab.pull(), node=NodeId.parse("b"))
            assert leecher.role == "leecher" and leecher.announce
            info_hash = info_hash_of(leecher)
            await announce(s1, one, announce_a, info_hash, 7101)
            reply = await announce(s2, two, leecher.announce, info_hash, 7102, left=5)
            assert reply[b"peers"] == bytes([127, 0, 0, 1]) + (7101).to_bytes(2, "big")


async def test_request_log_holds_no_credential(lab: Lab, tracker: RunningTracker) -> None:
    token = lab.pull()
    async with tracker.client() as (client, _):
        answer = await join(client, lab, lab.blob_a, token)
        assert answer.role == "origin"
    log = tracker.log()
    assert token.split()[1] not in log and token.split()[1][-20:] not in log
    assert '"path"' in log or "/join" in log
