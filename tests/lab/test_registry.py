"""The test support code against the real registry: its tokens are exactly what it accepts."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lab.images import (
    LAYER_TAR,
    LAYER_TAR_GZIP,
    MANIFEST_V2,
    push_image,
    random_tar_layer,
    sha256_digest,
)
from lab.pki import AUTH_NAME, LOOPBACK, REGISTRY_NAME, issue_server_files, write_ca
from lab.registry import Registry
from lab.services import free_port, start_realm
from lab.token_server import TokenServer, grant, write_config
from lab.tokens import TokenIssuer, new_signing_key

from common.certs import CertificateAuthority
from tests.conftest import USERS

REPO = "team/app"


async def get(registry: Registry, path: str, token: str | None, **headers: str) -> aiohttp.ClientResponse:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    connector = aiohttp.TCPConnector(ssl=registry.ssl_context())
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{registry.url}{path}", headers=headers) as response,
    ):
        await response.read()
        return response


async def manifest_status(registry: Registry, token: str | None, repo: str = REPO) -> int:
    response = await get(registry, f"/v2/{repo}/manifests/latest", token, Accept=MANIFEST_V2)
    return response.status


async def realm_token(server: TokenServer, registry: Registry, scope: str, auth: str | None) -> Any:
    connector = aiohttp.TCPConnector(ssl=registry.ssl_context())
    params = {"service": registry.service, "scope": scope}
    headers = {} if auth is None else {"Authorization": auth}
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(server.realm, params=params, headers=headers) as response,
    ):
        return response.status, await response.json()


def test_kid_is_the_libtrust_fingerprint() -> None:
    kid = TokenIssuer().kid
    groups = kid.split(":")
    assert len(groups) == 12
    assert all(len(g) == 4 and g.isalnum() and g.upper() == g for g in groups)


def test_grant_intersects_request_and_configuration() -> None:
    allowed: Mapping[str, list[str]] = {"a": ["pull"], "*": ["pull", "push"]}
    scopes = ["repository:a:pull,push", "repository:b:push", "registry:catalog:*", "garbage"]
    assert grant(allowed, scopes) == [("a", ["pull"]), ("b", ["push"])]
    assert grant({}, ["repository:a:pull"]) == []


@pytest.mark.parametrize("header", ["kid", "x5c"])
async def test_registry_accepts_issuer_tokens(registry: Registry, header: str) -> None:
    image = await push_image(registry, REPO, [random_tar_layer(1000, seed=1)])
    token = registry.issuer.token({REPO: ["pull"]}, header=header)  # type: ignore[arg-type]
    response = await get(registry, f"/v2/{REPO}/manifests/latest", token, Accept=MANIFEST_V2)
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == image.manifest_digest


@pytest.mark.parametrize(
    "bad",
    [
        {"expires_in": -120},  # beyond distribution's 60 s leeway
        {"not_before_offset": 120},
        {"audience": "another-registry"},
        {"issuer": "another-issuer"},
        {"key": new_signing_key()},  # forged: names our kid, signed by another key
        {"header": "none"},
        {"extra_claims": {"aud": ["shoal-test-registry"]}},  # distribution wants a string
    ],
    ids=["expired", "not-yet-valid", "audience", "issuer", "forged", "no-key-id", "aud-list"],
)
async def test_registry_rejects_bad_tokens(registry: Registry, bad: dict[str, Any]) -> None:
    await push_image(registry, REPO, [random_tar_layer(100, seed=2)])
    assert await manifest_status(registry, registry.issuer.token({REPO: ["pull"]})) == 200
    assert await manifest_status(registry, registry.issuer.token({REPO: ["pull"]}, **bad)) == 401


async def test_registry_rejects_token_for_another_repository(registry: Registry) -> None:
    await push_image(registry, REPO, [random_tar_layer(100, seed=3)])
    assert await manifest_status(registry, registry.issuer.token({"team/other": ["pull"]})) == 401


async def test_registry_accepts_rsa_kid_tokens(test_ca: CertificateAuthority, tmp_path: Path) -> None:
    issuer = TokenIssuer(key_type="rsa")
    async with Registry(tmp_path, test_ca, issuer, "https://127.0.0.1:1/token") as registry:
        await push_image(registry, REPO, [random_tar_layer(100, seed=4)])
        assert await manifest_status(registry, issuer.token({REPO: ["pull"]})) == 200
        assert await manifest_status(registry, issuer.token({REPO: ["pull"]}, header="x5c")) == 200


async def test_realm_round_trip(registry: Registry, token_server: TokenServer) -> None:
    await push_image(registry, REPO, [random_tar_layer(100, seed=5)])
    scope = f"repository:{REPO}:pull,push"
    status, body = await realm_token(
        token_server, registry, scope, aiohttp.encode_basic_auth("reader", "reader-secret")
    )
    assert status == 200
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert await manifest_status(registry, body["token"]) == 200

    status, body = await realm_token(token_server, registry, scope, None)
    assert status == 200
    assert await manifest_status(registry, body["token"]) == 401

    status, _ = await realm_token(token_server, registry, scope, aiohttp.encode_basic_auth("reader", "wrong"))
    assert status == 401


async def test_blob_get_count(registry: Registry) -> None:
    layer = random_tar_layer(50_000, seed=6)
    image = await push_image(registry, REPO, [layer])
    digest = image.layer_digests[0]
    assert digest == sha256_digest(layer)
    assert await registry.blob_get_count(digest) == 0  # the push's HEAD/PUT do not count
    token = registry.issuer.token({REPO: ["pull"]})
    for expected in (1, 2):
        response = await get(registry, f"/v2/{REPO}/blobs/{digest}", token)
        assert response.status == 200
        assert await registry.blob_get_count(digest) == expected
    response = await get(registry, f"/v2/{REPO}/blobs/{digest}", token, Range="bytes=0-999")
    assert response.status == 206
    assert await registry.blob_get_count(digest) == 3
    assert await registry.blob_bytes_sent(digest) == 2 * len(layer) + 1000
    assert await registry.blob_get_count(image.config_digest) == 0


async def skopeo(*args: str, hosts: Path) -> tuple[int, str]:
    """skopeo in a private mount namespace whose /etc/hosts names the registry (the host's is untouched)."""
    process = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), "skopeo", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")


async def test_skopeo_uses_realm(registry: Registry, tmp_path: Path) -> None:
    if shutil.which("skopeo") is None or shutil.which("unshare") is None:
        pytest.fail("skopeo and unshare are needed: install Debian packages skopeo and util-linux")
    layers = [random_tar_layer(100, seed=7), gzip.compress(random_tar_layer(3000, seed=8), mtime=0)]
    image = await push_image(registry, REPO, layers)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{LOOPBACK} {REGISTRY_NAME} {AUTH_NAME}\n")
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(registry.ca_pem, certs / "ca.crt")
    ref = f"docker://{registry.host}/{REPO}:latest"

    code, output = await skopeo(
        "inspect", "--cert-dir", str(certs), "--creds", "reader:reader-secret", ref, hosts=hosts
    )
    assert code == 0, output
    assert json.loads(output)["Digest"] == image.manifest_digest
    assert await registry.blob_get_count(image.config_digest) == 1  # inspect reads the config blob

    # A full copy checks every blob digest; the gzip layer went up as .tar.gzip.
    out = tmp_path / "copy"
    code, output = await skopeo(
        "copy", "--src-cert-dir", str(certs), "--src-creds", "reader:reader-secret", ref, f"dir:{out}",
        hosts=hosts,
    )  # fmt: skip
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [layer["mediaType"] for layer in manifest["layers"]] == [LAYER_TAR, LAYER_TAR_GZIP]
    for digest in image.layer_digests:
        assert await registry.blob_get_count(digest) == 1

    code, output = await skopeo(
        "inspect", "--cert-dir", str(certs), "--creds", "reader:wrong", ref, hosts=hosts
    )
    assert code != 0
    assert "401" in output or "unauthorized" in output.lower(), output


@pytest.fixture
async def token_server_process(
    test_ca: CertificateAuthority, token_issuer: TokenIssuer, tmp_path: Path
) -> AsyncIterator[str]:
    """The realm as the lab runs it: `python -m lab.token_server`, started by `lab.services`."""
    tls = issue_server_files(test_ca, tmp_path, "auth", LOOPBACK)
    listen = f"{LOOPBACK}:{free_port()}"
    config = write_config(
        tmp_path / "realm.json", token_issuer, tls, {"reader": USERS["reader"]}, {"public": ["pull"]},
        listen=listen,
    )  # fmt: skip
    ca_file = write_ca(test_ca, tmp_path / "ca.crt")
    async with await start_realm(config, f"https://{listen}", ca_file, timeout=20) as realm:
        yield f"https://{listen}/token"
    assert realm.process.returncode == 0  # SIGTERM is a clean stop


async def test_token_server_as_a_process(
    test_ca: CertificateAuthority, token_issuer: TokenIssuer, token_server_process: str, tmp_path: Path
) -> None:
    async with Registry(tmp_path / "registry", test_ca, token_issuer, token_server_process) as registry:
        await push_image(registry, REPO, [random_tar_layer(100, seed=8)])
        connector = aiohttp.TCPConnector(ssl=registry.ssl_context())
        params = {"service": registry.service, "scope": f"repository:{REPO}:pull"}
        headers = {"Authorization": aiohttp.encode_basic_auth("reader", "reader-secret")}
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(token_server_process, params=params, headers=headers) as response,
        ):
            token = (await response.json())["token"]
        assert await manifest_status(registry, token) == 200
