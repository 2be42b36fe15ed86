"""Rollouts on the lab, checked the way an operator would: registry access log, node metrics and
/status, tracker log, and the image in every dockerd.

One three-node cluster serves the whole module (starting one costs seconds, every case here pulls
its own freshly pushed image, and counters are compared before and after). A case that stops the
tracker or a node starts it again; the autouse fixture does too if a case failed half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lab.cluster import READER, TEAM_A, Cluster, Node
from lab.images import PushedImage
from lab.rollout import roll_out

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

NODES = 3
RATE = "100mbit"  # 12.5 MB/s per link, the registry's included: a 40 MB image takes seconds
CHUNK_SIZE = 4 * 2**20  # the layers here are 2-48 MB: most are several chunks
SOURCES = ("p2p", "upstream", "cache")
OCI_ERROR_CODES = {"BLOB_UNKNOWN", "UNAUTHORIZED", "DENIED", "NAME_UNKNOWN"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster(nodes=NODES, rate=RATE, tracker_options={"chunk_size": CHUNK_SIZE}) as running:
        yield running


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def everything_running(cluster: Cluster) -> None:
    """Start the tracker and every shoal-node that an earlier, failed case left stopped."""
    starts: list[Callable[[], Awaitable[None]]] = [cluster.start_tracker]
    starts += [lambda i=i: cluster.start_node(i) for i in range(NODES)]
    for start in starts:
        try:
            await start()
        except RuntimeError as error:
            if "is running" not in str(error):
                raise


# what an operator looks at


async def counters(nodes: list[Node]) -> list[dict[str, float]]:
    return [await node.blob_bytes() for node in nodes]


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {source: after[source] - before[source] for source in SOURCES}


def layer_sizes(image: PushedImage) -> list[int]:
    return [layer["size"] for layer in json.loads(image.manifest)["layers"]]


def blob_bytes(image: PushedImage) -> int:
    """What one pull of the image sends dockerd through the node: its layers and its config."""
    return sum(layer_sizes(image)) + json.loads(image.manifest)["config"]["size"]


def tracker_joins(cluster: Cluster, node: str, digests: list[str]) -> list[dict[str, Any]]:
    """The tracker's join records of `node` for these blobs."""
    return [record for d in digests for record in cluster.tracker_events("join", node=node, digest=d)]


def diagnostics(cluster: Cluster) -> str:
    parts = [f"--- {n.name}:\n{n.log()[-3000:]}" for n in cluster.nodes]
    parts.append(f"--- tracker:\n{cluster.tracker_log()[-3000:]}")
    return "\n".join(parts)


async def assert_has_image(node: Node, cluster: Cluster, image: PushedImage) -> None:
    assert await node.image_id(cluster.reference(image)) == image.config_digest, node.name


def cached_digests(node: Node) -> set[str]:
    """Blobs the node's cache holds as complete (its markers), as torrent names."""
    return {f"sha256-{path.name}" for path in (node.cache_dir / "blobs" / "sha256").iterdir()}


def sha256_cached(node: Node, name: str) -> str:
    """The SHA-256 of a cached blob, read the way it is served: its chunk files in order."""
    hex_digest = name.removeprefix("sha256-")
    chunks = sorted((node.cache_dir / "chunks" / hex_digest).iterdir(), key=lambda p: int(p.name))
    digest = hashlib.sha256()
    for path in chunks:
        with path.open("rb") as file:
            while block := file.read(2**20):
                digest.update(block)
    return digest.hexdigest()


async def assert_cache_sound(node: Node, image: PushedImage | None = None) -> None:
    """Every blob in the node's cache hashes to its name, and each of its chunk torrents in
    /status seeds without a failed piece; no torrent there has a failed piece. With `image`: its
    layers are cached. (Other torrents may still be downloading: the cluster is shared by the
    module, and a torrent whose client left goes on without it.)"""

    def seeding(status: Any) -> set[str]:
        return {b.get("name", "") for b in status["blobs"] if b.get("state") == "seeding"}

    def unfinished(status: Any) -> set[str]:
        return {b.get("name", "") for b in status["blobs"] if "name" in b and b.get("state") != "seeding"}

    async def settled() -> bool:
        """A leecher commits a blob to the cache just after it streamed the last byte to dockerd."""
        status = await node.status()
        return cached_digests(node) <= seeding(status) - unfinished(status)

    with contextlib.suppress(TimeoutError):
        await wait_until(f"{node.name} settles", settled, timeout=20)
    for name in cached_digests(node):
        assert await asyncio.to_thread(sha256_cached, node, name) == name.removeprefix("sha256-"), (
            f"{node.name}: corrupt {name}"
        )
    status = await node.status()
    assert status["state"] == "serving", status
    assert cached_digests(node) <= seeding(status) - unfinished(status), (status, node.log()[-4000:])
    for blob in status["blobs"]:
        assert blob.get("failed", 0) == 0, status
    if image is not None:
        missing = {
            d
            for d in image.layer_digests
            if f"sha256-{d.removeprefix('sha256:')}" not in cached_digests(node)
        }
        assert not missing, f"{node.name} did not cache {missing}:\n{node.log()[-6000:]}"


async def assert_sent_once(cluster: Cluster, image: PushedImage) -> None:
    """The registry sent each layer's bytes once in all (in chunks, to whichever nodes fetched them)."""
    for digest, size in zip(image.layer_digests, layer_sizes(image), strict=True):
        assert await cluster.registry.blob_bytes_sent(digest) == size, diagnostics(cluster)


@contextlib.asynccontextmanager
async def abandoned_pull(node: Node, reference: str) -> AsyncIterator[None]:
    """`docker pull` on `node` while its shoal-node gets killed under it. dockerd would retry that
    pull for over a minute against the node's old CA, so the case stops it on exit (killing the CLI
    cancels the pull in dockerd) and pulls again."""
    code, out = await node.login()
    assert code == 0, out
    process = await asyncio.create_subprocess_exec(
        "docker", "-H", node.docker_host, "pull", reference,
        env={"PATH": os.environ["PATH"], "DOCKER_CONFIG": str(node.workdir / "client")},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def wait_until(what: str, condition: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not after {timeout:.0f} s: {what}")
        await asyncio.sleep(0.05)


# A client inside a node's namespace: a token from the realm, then one GET (through the node's
# proxy, trusting the CA the node wrote for dockerd, or straight to the registry).
PROBE = r"""
import asyncio, json, ssl, sys
import aiohttp

async def main(args):
    headers = {}
    token = args.get("token")
    if token is not None:
        user = token.get("user")
        auth = aiohttp.BasicAuth(*user) if user else None
        trust = ssl.create_default_context(cafile=token["cafile"])
        async with aiohttp.ClientSession() as session, session.get(
            token["url"], params=token["params"], auth=auth, ssl=trust
        ) as response:
            response.raise_for_status()
            headers["Authorization"] = "Bearer " + (await response.json())["token"]
    trust = ssl.create_default_context(cafile=args["cafile"])
    async with aiohttp.ClientSession() as session, session.get(
        args["url"], headers=headers, proxy=args.get("proxy"), ssl=trust
    ) as response:
        body = await response.read()
    text = body[:4096].decode(errors="replace")
    result = {"status": response.status, "length": len(body), "body": text}
    print(json.dumps(result | {"authorization": headers.get("Authorization")}))

asyncio.run(main(json.loads(sys.argv[1])))
"""


async def probe(
    cluster: Cluster,
    node: Node,
    path: str,
    *,
    user: tuple[str, str] | None,
    scope: str,
    through_node: bool = True,
) -> dict[str, Any]:
    """GET `https://<registry>/<path>` from inside `node`'s namespace with a token of `user` (None:
    anonymous) for `scope`: {"status", "length", "body", "authorization" (the header it sent)}."""
    registry = cluster.registry.host
    node_ca = node.etc_docker / "certs.d" / registry / "shoal-node-ca.crt"  # as dockerd trusts it
    cafile = node_ca if through_node else cluster.ca_file
    args = {
        "url": f"https://{registry}{path}",
        "proxy": "http://127.0.0.1:65001" if through_node else None,
        "cafile": str(cafile),
        "token": {
            "url": cluster.realm,
            "params": {"service": cluster.registry.service, "scope": scope},
            "user": list(user) if user else None,
            "cafile": str(cluster.ca_file),
        },
    }
    code, out = await cluster.network.arun(node.name, [sys.executable, "-c", PROBE, json.dumps(args)])
    assert code == 0, out
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def join_tracker(
    cluster: Cluster, digest: str, repository: str, node: str, authorization: str
) -> tuple[int, Any]:
    """`POST /v1/blobs/<digest>/join` as a node would send it: (status, JSON body)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .sign(key, hashes.SHA256())
    )
    body = {
        "registry": cluster.registry.host,
        "repository": repository,
        "node": node,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
    }
    trust = ssl.create_default_context(cafile=str(cluster.ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{cluster.tracker_url}/v1/blobs/{digest}/join",
            json=body,
            headers={"Authorization": authorization},
            ssl=trust,
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


def oci_error(result: dict[str, Any]) -> dict[str, Any]:
    """The first error of an OCI error body; fails when the body is anything else (e.g. blob bytes)."""
    errors = json.loads(result["body"])["errors"]
    assert errors and errors[0]["code"] in OCI_ERROR_CODES, result
    error: dict[str, Any] = errors[0]
    return error


# the cases


async def test_peers_trade_a_layer_while_its_origins_still_fetch_it(cluster: Cluster) -> None:
    """One 48 MB layer of 12 chunks, all three nodes at once: the chunks are fetched from the
    registry by different nodes, and nodes take chunks from each other before the registry has
    sent the whole layer (read from the nodes' counters sampled during the pull)."""
    image = await cluster.push_image("rollout/pipelined", [48_000_000])
    (layer,) = image.layer_digests
    size = sum(layer_sizes(image))
    reference = cluster.reference(image)
    rollout = await roll_out(cluster, image, lambda node: node.pull(reference), sample_every=0.25)
    for node in cluster.nodes:
        await assert_has_image(node, cluster, image)
    await assert_sent_once(cluster, image)
    origins = {event["node"] for event in cluster.tracker_events("lease", digest=layer)}
    assert len(origins) >= 2, (origins, diagnostics(cluster))
    by_time: dict[float, dict[str, float]] = {}
    for sample in rollout.timeline:
        totals = by_time.setdefault(sample.seconds, dict.fromkeys(SOURCES, 0.0))
        for source in SOURCES:
            totals[source] += sample.bytes[source]
    overlapping = [t for t, sent in sorted(by_time.items()) if sent["p2p"] > 0 and sent["upstream"] < size]
    assert overlapping, (sorted(by_time.items()), diagnostics(cluster))


async def test_three_nodes_pull_at_once_and_share_every_layer(cluster: Cluster) -> None:
    image = await cluster.push_image("rollout/all-at-once", [8_000_000, 6_000_000, 4_000_000])
    reference = cluster.reference(image)
    before = await counters(cluster.nodes)
    await asyncio.gather(*(node.pull(reference) for node in cluster.nodes))
    for node in cluster.nodes:
        await assert_has_image(node, cluster, image)
    await assert_sent_once(cluster, image)
    moved = [delta(a, b) for a, b in zip(await counters(cluster.nodes), before, strict=True)]
    layer_bytes = sum(layer_sizes(image))
    # The registry sent each layer to one node; the other N-1 copies should come from peers.
    from_peers = sum(m["p2p"] for m in moved)
    assert from_peers >= 0.9 * (NODES - 1) * layer_bytes, (moved, diagnostics(cluster))


async def test_node_without_credential_gets_the_registrys_error_and_no_swarm(cluster: Cluster) -> None:
    owner, stranger = cluster.nodes[0], cluster.nodes[2]
    image = await cluster.push_image("team/private", [3_000_000, 2_000_000])
    reference = cluster.reference(image)
    await owner.pull(reference)  # READER: its layers are now in the swarm, seeded by the owner
    for digest in image.layer_digests:
        assert cluster.tracker_events("published", node=owner.name, digest=digest), diagnostics(cluster)
    before = await stranger.blob_bytes()

    await stranger.docker("logout", cluster.registry.host)
    code, through_node = await stranger.docker("pull", reference)
    assert code != 0, through_node
    assert await stranger.image_id(reference) is None

    # What dockerd says when it meets the registry itself: the registry by its address is not one
    # the node intercepts, so that pull is tunnelled to it untouched.
    direct_host = f"{cluster.network.ip('registry')}:{cluster.registry.port}"
    trust = stranger.etc_docker / "certs.d" / direct_host
    trust.mkdir(parents=True, exist_ok=True)
    shutil.copy(cluster.ca_file, trust / "ca.crt")
    code, direct = await stranger.docker("pull", f"{direct_host}/{image.repo}:{image.tag}")
    assert code != 0 and "denied" in direct, direct
    assert through_node == direct.replace(direct_host, cluster.registry.host), (through_node, direct)

    # The same stranger asking its node for a layer straight away: the registry's answer, no bytes.
    layer = image.layer_digests[0]
    blob = await probe(
        cluster, stranger, f"/v2/{image.repo}/blobs/{layer}", user=None, scope=f"repository:{image.repo}:pull"
    )
    assert blob["status"] == 401 and oci_error(blob)["code"] == "UNAUTHORIZED", blob

    assert tracker_joins(cluster, stranger.name, image.layer_digests) == [], diagnostics(cluster)
    assert delta(await stranger.blob_bytes(), before) == dict.fromkeys(SOURCES, 0)
    await assert_sent_once(cluster, image)  # the owner's fetch, nobody else's


async def test_credential_for_one_repository_opens_no_blob_of_another(cluster: Cluster) -> None:
    seeder, asker = cluster.nodes[0], cluster.nodes[1]
    await cluster.push_image("team/a", [2_000_000])
    team_b = await cluster.push_image("team/b", [4_000_000])
    await seeder.pull(cluster.reference(team_b), user=READER)
    secret = team_b.layer_digests[0]
    assert tracker_joins(cluster, seeder.name, [secret]), diagnostics(cluster)  # in the swarm now
    before = await asker.blob_bytes()

    # The path names the repository the token opens, with B's digest; then B's own path.
    for repo in ("team/a", "team/b"):
        answer = await probe(
            cluster, asker, f"/v2/{repo}/blobs/{secret}", user=TEAM_A, scope="repository:team/a:pull"
        )
        error = oci_error(answer)
        expected = {"team/a": (404, "BLOB_UNKNOWN"), "team/b": (401, "UNAUTHORIZED")}[repo]
        assert (answer["status"], error["code"]) == expected, answer
        assert answer["length"] < 1000, answer  # an error body, no byte of the blob

    # A node that skips its own registry check and asks the tracker with that token: refused too.
    token = answer["authorization"]
    status, body = await join_tracker(cluster, secret, "team/a", asker.name, token)
    assert (status, body["errors"][0]["code"]) == (403, "DENIED"), body

    assert tracker_joins(cluster, asker.name, [secret]) == [], diagnostics(cluster)
    assert delta(await asker.blob_bytes(), before) == dict.fromkeys(SOURCES, 0)
    assert await cluster.registry.blob_bytes_sent(secret) == layer_sizes(team_b)[0]  # the seeder's fetch only


async def test_tracker_killed_mid_rollout_every_pull_still_succeeds(cluster: Cluster) -> None:
    image = await cluster.push_image("rollout/tracker-dies", [16_000_000, 14_000_000, 10_000_000])
    reference = cluster.reference(image)
    total = NODES * blob_bytes(image)
    before = await counters(cluster.nodes)

    async def moved() -> list[dict[str, float]]:
        return [delta(a, b) for a, b in zip(await counters(cluster.nodes), before, strict=True)]

    async def swarming() -> bool:
        return sum(m["p2p"] for m in await moved()) > 0

    pulls = asyncio.gather(*(node.pull(reference) for node in cluster.nodes))
    try:
        await wait_until("a node takes bytes from a peer", swarming)
        await cluster.kill_tracker()
        at_kill = await moved()
        assert 0 < sum(sum(m.values()) for m in at_kill) < total, at_kill  # layers were in flight
        await pulls
    finally:
        await asyncio.gather(pulls, return_exceptions=True)
        await cluster.start_tracker()
    for node in cluster.nodes:
        await assert_has_image(node, cluster, image)
    after = await moved()
    assert sum(sum(m.values()) for m in after) == total, (at_kill, after)


async def test_origin_killed_mid_pull_the_others_still_finish(cluster: Cluster) -> None:
    origin, others = cluster.nodes[0], cluster.nodes[1:]
    image = await cluster.push_image("rollout/origin-dies", [20_000_000, 12_000_000])
    reference = cluster.reference(image)
    layer = image.layer_digests[0]
    start = await origin.blob_bytes()

    async def origin_fetching() -> bool:
        return (await origin.blob_bytes())["upstream"] > start["upstream"]

    async def others_joined() -> bool:
        return all(tracker_joins(cluster, node.name, [layer]) for node in others)

    async with abandoned_pull(origin, reference):
        await wait_until(f"{origin.name} fetches from the registry", origin_fetching)
        rest = asyncio.gather(*(node.pull(reference) for node in others))
        try:
            await wait_until("the other nodes asked for the layer", others_joined)
            fetched = delta(await origin.blob_bytes(), start)
            await cluster.kill_node(0)
            assert 0 < fetched["upstream"] < sum(layer_sizes(image)), fetched  # killed mid-pull
            await rest
        finally:
            await asyncio.gather(rest, return_exceptions=True)
    for node in others:
        await assert_has_image(node, cluster, image)
    await cluster.start_node(0)
    await origin.pull(reference)
    await assert_has_image(origin, cluster, image)


async def test_node_restarted_after_sigkill_serves_no_corrupt_blob(cluster: Cluster) -> None:
    image = await cluster.push_image("rollout/restarted", [20_000_000, 10_000_000])
    reference = cluster.reference(image)
    first, second, third = cluster.nodes
    size = sum(layer_sizes(image))

    async def killed_mid_download(index: int, source: str) -> None:
        """Pull on nodes[index] and SIGKILL its shoal-node once some, not all, bytes came from
        `source`; start it again with the same cache."""
        node = cluster.nodes[index]
        start = await node.blob_bytes()

        async def started() -> bool:
            return (await node.blob_bytes())[source] > start[source]

        async with abandoned_pull(node, reference):
            await wait_until(f"{node.name} takes bytes from {source}", started)
            fetched = delta(await node.blob_bytes(), start)
            await cluster.restart_node(index)
        assert 0 < fetched[source] < size, fetched  # killed mid-download

    # The origin dies with a partial download, comes back and fetches again; then a leecher dies
    # with a partial torrent, comes back, and finishes from the restarted origin.
    await killed_mid_download(1, "upstream")
    await assert_cache_sound(second)
    await second.pull(reference)
    await killed_mid_download(2, "p2p")
    await assert_cache_sound(third)
    await third.pull(reference)
    before = await first.blob_bytes()
    await first.pull(reference)  # its peers are the two restarted nodes
    assert delta(await first.blob_bytes(), before)["p2p"] > 0, diagnostics(cluster)
    for node in (second, third, first):
        await assert_has_image(node, cluster, image)
        await assert_cache_sound(node, image)
