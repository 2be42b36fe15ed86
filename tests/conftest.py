"""Shared fixtures: the test CA, a token realm and a real registry that trusts it; a small disk."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from lab.pki import AUTH_NAME, LOOPBACK, REGISTRY_NAME, issue_server_files, new_lab_ca
from lab.registry import Registry
from lab.token_server import TokenServer, User
from lab.tokens import TokenIssuer

from common.certs import CertificateAuthority

# Realm accounts of the `registry` fixture. Anonymous requests get a token with no access.
USERS = {
    "pusher": User("pusher-secret", {"*": ["pull", "push"]}),
    "reader": User("reader-secret", {"*": ["pull"]}),
}


@pytest.fixture(scope="session")
def test_ca() -> CertificateAuthority:
    return new_lab_ca()


@pytest.fixture
def token_issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest_asyncio.fixture
async def token_server(
    test_ca: CertificateAuthority, token_issuer: TokenIssuer, tmp_path: Path
) -> AsyncIterator[TokenServer]:
    tls = issue_server_files(test_ca, tmp_path / "auth", "auth", AUTH_NAME, REGISTRY_NAME, LOOPBACK)
    async with TokenServer(token_issuer, tls, USERS) as server:
        yield server


@pytest_asyncio.fixture
async def registry(
    test_ca: CertificateAuthority, token_issuer: TokenIssuer, token_server: TokenServer, tmp_path: Path
) -> AsyncIterator[Registry]:
    async with Registry(tmp_path / "registry", test_ca, token_issuer, token_server.realm) as reg:
        yield reg


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs; the tests run as root): a cache disk that fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
