"""The tracker as a process, against a real distribution registry with TLS and token auth."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import io
import json
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
from common.chunks import Chunk, plan
from common.ids import Digest, InfoHash, NodeId, Repository
from tests.common.test_certs import corrupt_signature
from tests.conftest import USERS
from tests.tracker.harness import RunningTracker, redis_server, run_tracker, tracker_config
from tests.tracker.torrents import make_metainfo
from tracker.client import Swarm, TrackerClient, TrackerRefused
from tracker.server import MAX_JSON_BODY

REPO_A, REPO_B = "team/app-a", "team/app-b"
NODE = NodeId.parse("node-1")
CHUNK_SIZE = 2**20


@dataclass
class Lab:
    registry: Registry
    tls_ca: CertificateAuthority
    work: Path
    blob_a: Digest  # only in REPO_A: four chunks, the last one short
    blob_b: Digest  # only in REPO_B: one chunk
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

    def chunks(self) -> list[Chunk]:
        return plan(len(self.blob_a_bytes), CHUNK_SIZE)

    def chunk_torrent(self, swarm: Swarm, index: int, *, lie: bool = False) -> bytes:
        """Chunk `index` of blob A as a node makes it; with `lie`, from other bytes of its length."""
        chunk = self.chunks()[index]
        data = self.blob_a_bytes[chunk.start : chunk.end]
        if lie:
            data = bytes(b ^ 0xFF for b in data)
        return make_metainfo(self.blob_a, data, swarm.ca.encode(), index)


def layer_bytes(seed: bytes, size: int) -> bytes:
    """Bytes that differ from chunk to chunk (so each chunk's torrent has its own pieces root)."""
    blocks = (hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(-(-size // 32)))
    return b"".join(blocks)[:size]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    work = tmp_path_factory.mktemp("tracker-lab")
    ca, issuer = new_lab_ca(), TokenIssuer()
    tls = issue_server_files(ca, work / "auth", "auth", AUTH_NAME, REGISTRY_NAME, LOOPBACK)
    async with (
        TokenServer(issuer, tls, USERS) as realm,
        Registry(work / "registry", ca, issuer, realm.realm) as registry,
    ):
        layer_a = layer_bytes(b"A", 3 * CHUNK_SIZE + CHUNK_SIZE // 2 + 123)
        layer_b = layer_bytes(b"B", 440_000)
        image_a = await push_image(registry, REPO_A, [layer_a])
        image_b = await push_image(registry, REPO_B, [layer_b])
        blob_a, blob_b = (Digest.parse(image.layer_digests[0]) for image in (image_a, image_b))
        yield Lab(registry, new_lab_ca(), work, blob_a, blob_b, layer_a)


def config_for(lab: Lab, work: Path, **overrides: Any) -> dict[str, Any]:
    # No lone_grace: a lone joiner takes both chunks_in_flight leases at once, which most tests build on.
    config = tracker_config(
        work, lab.tls_ca, [lab.registry_entry()], chunk_size="1MiB", lone_grace=0, chunks_in_flight=2
    )
    return config | overrides


@pytest_asyncio.fixture(loop_scope="module")
async def tracker(lab: Lab, tmp_path: Path) -> AsyncIterator[RunningTracker]:
    async with run_tracker(tmp_path, lab.tls_ca, config_for(lab, tmp_path)) as running:
        yield running


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def join(
    client: TrackerClient, lab: Lab, blob: Digest | None = None, authorization: str | None = None,
    repo: str = REPO_A, node: NodeId = NODE, csr: str | None = None,
) -> Swarm:  # fmt: skip
    return await client.join(
        blob or lab.blob_a, lab.registry.host, Repository.parse(repo), node, csr or make_csr(new_key()),
        authorization or lab.pull(repo),
    )  # fmt: skip


async def report(
    client: TrackerClient, lab: Lab, swarm: Swarm, authorization: str | None = None
) -> list[int]:
    return await client.report(
        lab.blob_a, "digest_mismatch", swarm.key, lab.registry.host, Repository.parse(REPO_A),
        authorization or lab.pull(),
    )  # fmt: skip


async def metric(session: aiohttp.ClientSession, tracker: RunningTracker, name: str) -> float:
    async with session.get(f"{tracker.url}/metrics", ssl=tracker.ssl_context()) as resp:
        text = await resp.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
               (line.startswith(name + "{") and not line.startswith("#")))  # fmt: skip


def events(tracker: RunningTracker, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in tracker.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def forge(key: str) -> str:
    return key[:-1] + ("1" if key.endswith("0") else "0")


def leased(swarm: Any) -> list[int]:
    return [lease.index for lease in swarm.leases]


def token(swarm: Any, index: int) -> str:
    return next(lease.token for lease in swarm.leases if lease.index == index)


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
            await client.join(
                lab.blob_a, lab.registry.host, Repository.parse(REPO_A), NODE, make_csr(new_key()),
                make_auth(lab),
            )  # fmt: skip
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
        # ... while B's own token opens it: one chunk, leased to the joiner.
        answer = await join(client, lab, lab.blob_b, lab.pull(REPO_B), repo=REPO_B)
        assert (answer.size, answer.chunk_size, leased(answer)) == (440_000, CHUNK_SIZE, [0])


async def test_valid_join_gets_a_blob_scoped_certificate_and_leases(
    lab: Lab, tracker: RunningTracker
) -> None:
    key = new_key()
    async with tracker.client() as (client, session):
        answer = await join(client, lab, csr=make_csr(key))
        async with session.get(f"{tracker.url}/v1/ca", ssl=tracker.ssl_context()) as resp:
            ca = x509.load_pem_x509_certificate(await resp.read())
        assert await metric(session, tracker, "shoal_tracker_joins_total") == 1
        assert await metric(session, tracker, "shoal_tracker_chunk_leases_total") == 2
    assert (answer.size, answer.chunk_size) == (len(lab.blob_a_bytes), CHUNK_SIZE)
    assert answer.chunks == [] and leased(answer) == [0, 1]  # a lone joiner: chunks_in_flight leases
    assert all(lease.seconds == 20 for lease in answer.leases)
    assert answer.announce.endswith(f"shoal_key={answer.key}")
    cert = x509.load_pem_x509_certificate(answer.cert.encode())
    cert.verify_directly_issued_by(ca)
    assert cert.public_key() == key.public_key()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [lab.blob_a.torrent_name]
    assert "*" not in sans.get_values_for_type(x509.DNSName)
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=5, minutes=58) < lifetime <= dt.timedelta(hours=6)
    assert answer.expires_at == int(cert.not_valid_after_utc.timestamp())
    assert [(e["node"], e["chunk"]) for e in events(tracker, "lease")] == [(str(NODE), 0), (str(NODE), 1)]
    assert [(e["node"], e["digest"]) for e in events(tracker, "join")] == [(str(NODE), str(lab.blob_a))]


async def test_malformed_requests_get_400_oci_errors(lab: Lab, tracker: RunningTracker) -> None:
    good = make_csr(new_key())
    bad_sig = corrupt_signature(good)
    a = str(lab.blob_a)
    async with tracker.client() as (client, session):
        swarm = await join(client, lab)
        for method, path, body in [
            ("POST", "sha256:xyz/join", {}),
            ("POST", f"{a}/join", "not json"),
            ("POST", f"{a}/join", "[" * 100_000),
            ("POST", f"{a}/sync", '{"a":' * 100_000),
            ("POST", f"{a}/sync", json.dumps({"key": "k" * MAX_JSON_BODY})),
            ("POST", f"{a}/join", {"registry": lab.registry.host, "repository": REPO_A, "node": "n",
                                   "csr": bad_sig}),
            ("POST", f"{a}/join", {"registry": "elsewhere:5000", "repository": REPO_A, "node": "n",
                                   "csr": good}),
            ("POST", f"{a}/join", {"registry": lab.registry.host, "repository": "Bad//Repo", "node": "n",
                                   "csr": good}),
            ("POST", f"{a}/sync", {"key": swarm.key, "known": ["XY"], "wait": 0}),
            ("POST", f"{a}/sync", {"key": swarm.key, "known": [], "wait": "long"}),
            ("POST", f"{a}/progress", {"lease": token(swarm, 0), "bytes": -1}),
            ("PUT", f"{a}/chunks/x/torrent", ""),
            ("PUT", f"{a}/chunks/%D9%A3/torrent", ""),  # an Arabic-Indic 3
            ("PUT", f"{a}/chunks/%C2%B2/torrent", ""),  # a superscript 2
            ("PUT", f"{a}/chunks/0/torrent", "not bencode"),
            ("POST", f"{a}/report", {"reason": "boredom", "key": swarm.key}),
        ]:  # fmt: skip
            data = (
                io.BytesIO(body.encode()) if isinstance(body, str) else None
            )  # a stream: aiohttp warns of large bytes
            headers = {"Authorization": lab.pull(), "Shoal-Lease": token(swarm, 0)}
            async with session.request(
                method, f"{tracker.url}/v1/blobs/{path}", ssl=tracker.ssl_context(),
                json=None if data is not None else body, data=data, headers=headers,
            ) as resp:  # fmt: skip
                payload = await resp.json()
                assert resp.status == 400, (path, body, payload)
                assert payload["errors"][0]["code"] in ("BAD_REQUEST", "DIGEST_INVALID")


async def test_publishing_a_chunk_reaches_the_other_nodes_sync(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, session):
        first = await join(client, lab, node=NodeId.parse("first"))
        second = await join(client, lab, node=NodeId.parse("second"))
        assert (leased(first), leased(second)) == ([0, 1], [])  # two chunks in flight already
        info_0 = await client.publish_chunk(lab.blob_a, 0, token(first, 0), lab.chunk_torrent(first, 0))
        assert info_0 == InfoHash.from_v2(hashlib.sha256(bencoding.encode(
            bencoding.decode(lab.chunk_torrent(first, 0))[b"info"])).digest()).hex  # fmt: skip

        synced = await client.sync(lab.blob_a, second.key, [], wait=5)
        assert [(c.index, c.info_hash) for c in synced.chunks] == [(0, info_0)]
        assert synced.chunks[0].metainfo == lab.chunk_torrent(first, 0)
        assert synced.withdrawn == [] and leased(synced) == [2]  # the freed slot, to the node without one
        again = await client.sync(lab.blob_a, first.key, [info_0], wait=0)
        assert again.chunks == [] and leased(again) == [1]  # no second lease while `second` holds one

        # A long-poll returns when the chunk it waits for is published meanwhile.
        waiting = asyncio.ensure_future(client.sync(lab.blob_a, second.key, [info_0], wait=20))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        info_1 = await client.publish_chunk(lab.blob_a, 1, token(first, 1), lab.chunk_torrent(first, 1))
        woken = await waiting
        assert [(c.index, c.info_hash) for c in woken.chunks] == [(1, info_1)] and leased(woken) == [2]

        late = await join(client, lab, node=NodeId.parse("late"))
        assert [c.index for c in late.chunks] == [0, 1] and leased(late) == [3]
        assert await metric(session, tracker, "shoal_tracker_torrents_published_total") == 2
        assert await metric(session, tracker, "shoal_tracker_syncs_total") == 3
    assert [(e["node"], e["chunk"]) for e in events(tracker, "published")] == [("first", 0), ("first", 1)]


async def test_sync_needs_the_blobs_own_announce_key(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, _):
        swarm_a = await join(client, lab)
        swarm_b = await join(client, lab, lab.blob_b, repo=REPO_B)
        for key in [forge(swarm_a.key), swarm_b.key, "garbage"]:
            with pytest.raises(TrackerRefused) as refused:
                await client.sync(lab.blob_a, key, [], wait=0)
            assert (refused.value.status, refused.value.code) == (403, "DENIED")
        assert leased(await client.sync(lab.blob_a, swarm_a.key, [], wait=0)) == [0, 1]


async def test_publish_and_progress_check_the_lease_and_the_metainfo(
    lab: Lab, tracker: RunningTracker
) -> None:
    async with tracker.client() as (client, _):
        origin = await join(client, lab, node=NodeId.parse("origin"))
        other = await join(client, lab, node=NodeId.parse("other"))
        good = lab.chunk_torrent(origin, 0)
        for index, lease in [(0, "not-the-lease"), (1, token(origin, 0)), (7, token(origin, 0))]:
            with pytest.raises(TrackerRefused) as wrong_lease:
                await client.publish_chunk(lab.blob_a, index, lease, good)
            assert wrong_lease.value.status == 409
        with pytest.raises(TrackerRefused) as not_holder:
            await client.progress(lab.blob_a, "not-the-lease", 100)
        assert (not_holder.value.status, not_holder.value.code) == (409, "CONFLICT")
        for bad in [
            make_metainfo(lab.blob_a, lab.blob_a_bytes[:CHUNK_SIZE], new_lab_ca().cert_pem, 0),  # other CA
            lab.chunk_torrent(origin, 1),  # chunk 1's torrent offered as chunk 0
            make_metainfo(lab.blob_a, lab.blob_a_bytes[: CHUNK_SIZE - 1], origin.ca.encode(), 0),  # length
        ]:
            with pytest.raises(TrackerRefused) as refused:
                await client.publish_chunk(lab.blob_a, 0, token(origin, 0), bad)
            assert refused.value.status == 400
        await client.progress(lab.blob_a, token(origin, 0), 100)
        await client.publish_chunk(lab.blob_a, 0, token(origin, 0), good)
        with pytest.raises(TrackerRefused) as spent:  # publishing freed the lease
            await client.progress(lab.blob_a, token(origin, 0), 200)
        assert spent.value.status == 409
        assert leased(await client.sync(lab.blob_a, other.key, [], wait=0)) == [2]


async def test_an_expired_lease_goes_to_another_joiner(lab: Lab, tmp_path: Path) -> None:
    config = config_for(lab, tmp_path, origin_lease=2)
    async with run_tracker(tmp_path, lab.tls_ca, config) as tracker, tracker.client() as (client, _):
        first = await join(client, lab, node=NodeId.parse("first"))
        second = await join(client, lab, node=NodeId.parse("second"))
        assert (leased(first), leased(second)) == ([0, 1], [])
        waiting = asyncio.ensure_future(client.sync(lab.blob_a, second.key, [], wait=15))
        await asyncio.sleep(1)
        await client.progress(lab.blob_a, token(first, 0), 1000)  # progress keeps chunk 0...
        woken = await waiting  # ...while silence loses chunk 1, and the long-poll hears of it
        assert woken.chunks == [] and leased(woken) == [1]
        with pytest.raises(TrackerRefused) as lost:
            await client.progress(lab.blob_a, token(first, 1), 3000)
        assert lost.value.status == 409
        with pytest.raises(TrackerRefused):
            await client.publish_chunk(lab.blob_a, 1, token(first, 1), lab.chunk_torrent(first, 1))
        await client.publish_chunk(lab.blob_a, 0, token(first, 0), lab.chunk_torrent(first, 0))


async def test_a_stopping_tracker_answers_its_long_polls(lab: Lab, tmp_path: Path) -> None:
    async with run_tracker(tmp_path, lab.tls_ca, config_for(lab, tmp_path)) as tracker:
        async with tracker.client() as (client, _):
            swarm = await join(client, lab)
            waiting = asyncio.ensure_future(client.sync(lab.blob_a, swarm.key, [], wait=30))
            await asyncio.sleep(0.5)
            assert await tracker.service.stop() == 0
            answer = await waiting  # an answer, not a connection cut after the server's grace period
        assert answer.chunks == [] and leased(answer) == [0, 1]


async def test_report_withdraws_a_chunk_made_from_other_bytes(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, session):
        liar = await join(client, lab, node=NodeId.parse("liar"))
        honest_0 = await client.publish_chunk(lab.blob_a, 0, token(liar, 0), lab.chunk_torrent(liar, 0))
        lie = await client.publish_chunk(lab.blob_a, 1, token(liar, 1), lab.chunk_torrent(liar, 1, lie=True))
        reporter = await join(client, lab, node=NodeId.parse("reporter"))
        with pytest.raises(TrackerRefused) as forged:
            await client.report(lab.blob_a, "digest_mismatch", forge(reporter.key), lab.registry.host,
                                Repository.parse(REPO_A), lab.pull())  # fmt: skip
        assert forged.value.status == 403
        with pytest.raises(TrackerRefused) as other_repo:  # may pull B, not this blob
            await report(client, lab, reporter, authorization=lab.pull(REPO_B))
        assert other_repo.value.status == 403
        gets = await lab.registry.blob_get_count(str(lab.blob_a))

        assert await report(client, lab, reporter) == [1]
        assert await lab.registry.blob_get_count(str(lab.blob_a)) == gets + 1
        synced = await client.sync(lab.blob_a, reporter.key, [honest_0, lie], wait=0)
        assert synced.withdrawn == [lie]
        assert leased(await join(client, lab, node=NodeId.parse("third"))) == [1]
        assert 1 not in leased(await client.sync(lab.blob_a, liar.key, [honest_0], wait=0))  # barred
        assert await report(client, lab, reporter) == []  # chunk 0 is verified now, chunk 1 gone
        assert await lab.registry.blob_get_count(str(lab.blob_a)) == gets + 1
        assert await metric(session, tracker, "shoal_tracker_torrents_withdrawn_total") == 1
        assert await metric(session, tracker, 'shoal_tracker_reports_total{reason="digest_mismatch"}') == 2
    [withdrawn] = events(tracker, "withdrawn")
    assert (withdrawn["node"], withdrawn["chunk"], withdrawn["reporter"]) == ("liar", 1, "reporter")
    assert withdrawn["digest"] == str(lab.blob_a)


async def test_a_false_report_withdraws_nothing_and_is_checked_once(
    lab: Lab, tracker: RunningTracker
) -> None:
    async with tracker.client() as (client, session):
        origin = await join(client, lab, node=NodeId.parse("origin"))
        for index in (0, 1):
            await client.publish_chunk(
                lab.blob_a, index, token(origin, index), lab.chunk_torrent(origin, index)
            )
        gets = await lab.registry.blob_get_count(str(lab.blob_a))
        assert await report(client, lab, origin) == []
        assert await lab.registry.blob_get_count(str(lab.blob_a)) == gets + 1
        assert await report(client, lab, origin) == []  # both chunks verified: no second registry read
        assert await lab.registry.blob_get_count(str(lab.blob_a)) == gets + 1
        assert await metric(session, tracker, "shoal_tracker_torrents_withdrawn_total") == 0
        assert await metric(session, tracker, "shoal_tracker_verify_bytes_total") == 2 * CHUNK_SIZE
        bad_peer = await client.report(lab.blob_a, "bad_peer", origin.key, lab.registry.host,
                                       Repository.parse(REPO_A), None, peer="10.0.0.9:6881")  # fmt: skip
        assert bad_peer == []
        assert await metric(session, tracker, 'shoal_tracker_reports_total{reason="bad_peer"}') == 1
    assert [(e["node"], e["level"]) for e in events(tracker, "false_report")] == [("origin", "warning")] * 2


async def announce(
    session: aiohttp.ClientSession, tracker: RunningTracker, url: str | None, info_hash: bytes, port: int,
    left: int = 0, extra: str = "",
) -> dict[bytes, Any]:  # fmt: skip
    base = url or f"{tracker.url}/announce?x=1"
    query = f"&info_hash={quote_from_bytes(info_hash)}&port={port}&left={left}&compact=1{extra}"
    async with session.get(base + query, ssl=tracker.ssl_context()) as resp:
        return bencoding.decode(await resp.read())  # type: ignore[no-any-return]


def from_address(ip: str) -> aiohttp.ClientSession:
    """A client whose connections come from `ip` (any of 127.0.0.0/8 is this machine's)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0)))


def peers_of(reply: dict[bytes, Any]) -> list[tuple[str, int]]:
    raw = reply[b"peers"]
    return [(".".join(map(str, raw[i : i + 4])), int.from_bytes(raw[i + 4 : i + 6], "big"))
            for i in range(0, len(raw), 6)]  # fmt: skip


async def test_nodes_announce_the_blobs_swarm_id(lab: Lab, tracker: RunningTracker) -> None:
    swarm_id = lab.blob_a.swarm_id.raw
    async with tracker.client() as (client, session):
        seeder = await join(client, lab, node=NodeId.parse("seeder"))
        leecher = await join(client, lab, node=NodeId.parse("leecher"))
        seeded = await announce(session, tracker, seeder.announce, swarm_id, 7001)
        assert b"failure reason" not in seeded
        reply = await announce(session, tracker, leecher.announce, swarm_id, 7002, left=100)
        assert reply[b"peers"] == bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")
        assert (reply[b"complete"], reply[b"incomplete"]) == (1, 1)

        no_key = await announce(session, tracker, None, swarm_id, 7003)
        assert b"failure reason" in no_key and b"peers" not in no_key
        other_hash = await announce(session, tracker, leecher.announce, lab.blob_b.swarm_id.raw, 7003)
        assert b"another torrent" in other_hash[b"failure reason"]

        scrape_url = leecher.announce.replace("/announce?", "/scrape?")
        query = f"&info_hash={quote_from_bytes(swarm_id)}&info_hash={quote_from_bytes(b'x' * 20)}"
        async with session.get(scrape_url + query, ssl=tracker.ssl_context()) as resp:
            files = bencoding.decode(await resp.read())[b"files"]
        assert files == {swarm_id: {b"complete": 1, b"incomplete": 1, b"downloaded": 0}}


async def test_a_second_key_naming_a_node_gets_none_of_its_leases(lab: Lab, tracker: RunningTracker) -> None:
    async with tracker.client() as (client, _):
        first = await join(client, lab, node=NODE)
        impostor = await join(client, lab, node=NODE)  # another key, the same node id
        assert (leased(first), leased(impostor)) == ([0, 1], [])
        assert leased(await client.sync(lab.blob_a, impostor.key, [], wait=0)) == []
        assert impostor.key != first.key
        await client.progress(lab.blob_a, token(first, 0), 100)
        await client.publish_chunk(lab.blob_a, 0, token(first, 0), lab.chunk_torrent(first, 0))
        own = await client.sync(lab.blob_a, impostor.key, [], wait=0)
        assert leased(own) == [2]  # a lease of its own, for the slot that came free
        with pytest.raises(TrackerRefused) as refused:  # its lease does not publish the first's chunk
            await client.publish_chunk(lab.blob_a, 1, token(own, 2), lab.chunk_torrent(first, 1))
        assert refused.value.status == 409
        assert leased(await client.sync(lab.blob_a, first.key, [], wait=0)) == [1]
        await client.publish_chunk(lab.blob_a, 1, token(first, 1), lab.chunk_torrent(first, 1))
    joins = events(tracker, "join")
    assert [e["node"] for e in joins] == [str(NODE)] * 2 and len({e["key"] for e in joins}) == 2
    assert len({e["key"] for e in events(tracker, "published")}) == 1


async def test_an_announce_with_another_key_neither_replaces_nor_evicts_an_entry(
    lab: Lab, tracker: RunningTracker
) -> None:
    swarm_id = lab.blob_a.swarm_id.raw
    async with (
        tracker.client() as (client, impostor_address),
        from_address("127.0.0.2") as honest_address,
        from_address("127.0.0.3") as observer_address,
    ):
        honest = await join(client, lab, node=NODE)
        impostor = await join(client, lab, node=NODE)  # the same node id, another key
        observer = await join(client, lab, node=NodeId.parse("observer"))
        await announce(honest_address, tracker, honest.announce, swarm_id, 7201)
        reply = await announce(impostor_address, tracker, impostor.announce, swarm_id, 7201, left=5)
        assert peers_of(reply) == [("127.0.0.2", 7201)]
        await announce(impostor_address, tracker, impostor.announce, swarm_id, 7201, extra="&event=stopped")
        seen = await announce(observer_address, tracker, observer.announce, swarm_id, 7202, left=5)
        assert peers_of(seen) == [("127.0.0.2", 7201)]  # the honest node's entry, and only it


async def test_peers_are_listed_at_the_address_they_announce_from(lab: Lab, tracker: RunningTracker) -> None:
    swarm_id = lab.blob_a.swarm_id.raw
    async with tracker.client() as (client, session), from_address("127.0.0.2") as elsewhere:
        seeder = await join(client, lab, node=NodeId.parse("seeder"))
        leecher = await join(client, lab, node=NodeId.parse("leecher"))
        await announce(elsewhere, tracker, seeder.announce, swarm_id, 7301, extra="&ip=10.9.9.9")
        reply = await announce(session, tracker, leecher.announce, swarm_id, 7302, left=5)
        assert peers_of(reply) == [("127.0.0.2", 7301)]


async def test_many_joins_from_one_address_fill_at_most_peers_per_address_places(
    lab: Lab, tmp_path: Path
) -> None:
    swarm_id = lab.blob_a.swarm_id.raw
    config = config_for(lab, tmp_path, peers_per_address=3)
    async with (
        run_tracker(tmp_path, lab.tls_ca, config) as tracker,
        tracker.client() as (client, sybils),
        from_address("127.0.0.2") as honest_address,
        from_address("127.0.0.3") as newcomer_address,
    ):
        honest = await join(client, lab, node=NodeId.parse("honest"))
        await announce(honest_address, tracker, honest.announce, swarm_id, 7401, left=5, extra="&uploaded=9")
        credential = lab.pull()  # one credential, 150 joins with fresh keys and node ids
        for i in range(150):
            sybil = await join(client, lab, node=NodeId.parse(f"sybil-{i}"), authorization=credential)
            await announce(sybils, tracker, sybil.announce, swarm_id, 8000 + i, left=5)
        newcomer = await join(client, lab, node=NodeId.parse("newcomer"))
        reply = await announce(newcomer_address, tracker, newcomer.announce, swarm_id, 7402, left=5,
                               extra="&numwant=200")  # fmt: skip
        assert sorted(peers_of(reply)) == [("127.0.0.1", 8147), ("127.0.0.1", 8148), ("127.0.0.1", 8149),
                                           ("127.0.0.2", 7401)]  # fmt: skip
        assert reply[b"incomplete"] == 5
        first = await announce(newcomer_address, tracker, newcomer.announce, swarm_id, 7402, left=5,
                               extra="&numwant=1")  # fmt: skip
        assert peers_of(first) == [("127.0.0.2", 7401)]  # the one that has served comes first


async def test_a_dead_swarm_gets_new_origins(lab: Lab, tmp_path: Path) -> None:
    config = config_for(lab, tmp_path, announce_interval=1)
    async with run_tracker(tmp_path, lab.tls_ca, config) as tracker, tracker.client() as (client, _):
        gone = await join(client, lab, node=NodeId.parse("gone"))
        await client.publish_chunk(lab.blob_a, 0, token(gone, 0), lab.chunk_torrent(gone, 0))
        await asyncio.sleep(1.2)  # one announce interval, and the publisher never announced
        fresh = await join(client, lab, node=NodeId.parse("fresh"))
        assert fresh.chunks == [] and leased(fresh) == [0]
    [reset] = events(tracker, "reset")
    assert reset["chunks"] == [0]


async def test_restart_keeps_ca_and_chunks(lab: Lab, tmp_path: Path) -> None:
    config = config_for(lab, tmp_path)
    async with run_tracker(tmp_path, lab.tls_ca, config) as first, first.client() as (client, _):
        origin = await join(client, lab, node=NodeId.parse("origin"))
        info_0 = await client.publish_chunk(lab.blob_a, 0, token(origin, 0), lab.chunk_torrent(origin, 0))
    assert oct((tmp_path / "tracker-state" / "swarm-ca.pem").stat().st_mode & 0o777) == "0o600"
    async with run_tracker(tmp_path, lab.tls_ca, config) as second, second.client() as (client, _):
        again = await join(client, lab, node=NodeId.parse("again"))
    assert [c.info_hash for c in again.chunks] == [info_0] and again.ca == origin.ca


async def test_two_trackers_share_chunks_leases_and_peers_through_redis(lab: Lab, tmp_path: Path) -> None:
    with redis_server(tmp_path) as redis_url:
        config_one = config_for(lab, tmp_path, store=redis_url)
        config_two = config_for(lab, tmp_path, store=redis_url)
        async with (
            run_tracker(tmp_path, lab.tls_ca, config_one) as one,
            run_tracker(tmp_path, lab.tls_ca, config_two) as two,
            one.client() as (c1, s1),
            two.client() as (c2, s2),
        ):
            first = await join(c1, lab, node=NodeId.parse("a"))
            second = await join(c2, lab, node=NodeId.parse("b"))
            assert (leased(first), leased(second)) == ([0, 1], [])
            # b long-polls replica two; a publishes through replica one.
            waiting = asyncio.ensure_future(c2.sync(lab.blob_a, second.key, [], wait=20))
            await asyncio.sleep(0.5)
            info_0 = await c1.publish_chunk(lab.blob_a, 0, token(first, 0), lab.chunk_torrent(first, 0))
            woken = await waiting
            assert [c.info_hash for c in woken.chunks] == [info_0] and leased(woken) == [2]
            swarm_id = lab.blob_a.swarm_id.raw
            await announce(s1, one, first.announce, swarm_id, 7101)
            reply = await announce(s2, two, second.announce, swarm_id, 7102, left=5)
            assert reply[b"peers"] == bytes([127, 0, 0, 1]) + (7101).to_bytes(2, "big")


async def test_request_log_holds_no_credential(lab: Lab, tracker: RunningTracker) -> None:
    credential = lab.pull()
    async with tracker.client() as (client, _):
        swarm = await join(client, lab, authorization=credential)
        await client.sync(lab.blob_a, swarm.key, [], wait=0)
        await report(client, lab, swarm, authorization=credential)
    log = tracker.log()
    for secret in (credential.split()[1], swarm.key):
        assert secret not in log and secret[-20:] not in log
    assert "/join" in log and "/sync" in log
