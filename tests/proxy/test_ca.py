"""The node CA: leaves a Go-like client accepts, the bounded cache, the certs.d files."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from common.certs import cert_pem
from proxy.ca import CA_FILE, LEAF_LIFETIME, LeafContexts, ca_files, issue_leaf, node_ca

CA = node_ca("test-node")


def test_leaf_names_the_host_in_a_san() -> None:
    cert, key = issue_leaf(CA, "registry.example")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["registry.example"]
    assert cert.issuer == CA.cert.subject
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= LEAF_LIFETIME + dt.timedelta(minutes=10)
    assert b"PRIVATE KEY" in key
    ip_cert, _ = issue_leaf(CA, "10.1.2.3")
    ip_san = ip_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in ip_san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> x509.Certificate:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=name)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der)
    finally:
        listener.close()


async def test_leaf_context_passes_hostname_verification(tmp_path: Path) -> None:
    leaves = LeafContexts(CA)
    client = ssl.create_default_context(cadata=cert_pem(CA.cert).decode())
    cert = await handshake(leaves.context("registry.example"), client, "registry.example")
    assert cert.issuer == CA.cert.subject
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(leaves.context("registry.example"), client, "other.example")
    stranger = ssl.create_default_context()  # the system trust does not know the node CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(leaves.context("registry.example"), stranger, "registry.example")


def test_leaf_cache_reuses_and_is_bounded() -> None:
    leaves = LeafContexts(CA, size=2)
    first = leaves.context("a.example")
    assert leaves.context("a.example") is first
    leaves.context("b.example")
    leaves.context("c.example")  # evicts a (least recently used)
    assert leaves.context("a.example") is not first


def test_ca_files_lifecycle(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    operator_dir = certs / "registry.example:5000"
    operator_dir.mkdir(parents=True)
    (operator_dir / "ca.crt").write_text("operator's CA\n")
    (operator_dir / "client.cert").write_text("operator's client cert\n")
    hosts = ["registry.example:5000", "other.example:443"]
    with ca_files(CA, certs, hosts) as written:
        assert sorted(p.relative_to(certs).as_posix() for p in written) == sorted(
            [f"registry.example:5000/{CA_FILE}", f"other.example:443/{CA_FILE}", f"other.example/{CA_FILE}"]
        )
        for path in written:
            assert x509.load_pem_x509_certificate(path.read_bytes()) == CA.cert
            assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in operator_dir.iterdir()) == ["ca.crt", "client.cert"]
    assert (operator_dir / "ca.crt").read_text() == "operator's CA\n"
    assert sorted(p.name for p in certs.iterdir()) == ["registry.example:5000"]  # ours went again


def test_ca_files_removed_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ca_files(CA, tmp_path, ["r.example:5000"]):
        assert (tmp_path / "r.example:5000" / CA_FILE).exists()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
