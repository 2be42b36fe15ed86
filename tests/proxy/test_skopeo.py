"""skopeo, a real Go registry client, through the node against the real registry."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from lab.images import push_image, random_tar_layer
from lab.registry import Registry

from tests.proxy.harness import node_config, registry_entry, run_node

REPO = "team/app"


async def skopeo(*args: str, proxy: str) -> tuple[int, str, str]:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is missing: apt-get install skopeo")
    process = await asyncio.create_subprocess_exec(
        "skopeo", *args,
        env={"HTTPS_PROXY": proxy, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def trust_dir(tmp_path: Path, *pems: Path) -> Path:
    """A skopeo --cert-dir: the node CA for the registry, the test CA for the token realm."""
    directory = tmp_path / "skopeo-certs"
    directory.mkdir(exist_ok=True)
    for i, pem in enumerate(pems):
        shutil.copy(pem, directory / f"{i}.crt")
    return directory


async def test_skopeo_inspect_and_copy_through_node(registry: Registry, tmp_path: Path) -> None:
    layers = [random_tar_layer(900_000, seed=11), random_tar_layer(2000, seed=12)]
    image = await push_image(registry, REPO, layers)
    async with run_node(tmp_path, node_config(tmp_path, [registry_entry(registry)])) as node:
        certs = trust_dir(tmp_path, node.ca_file(registry.host), registry.ca_pem)
        ref = f"docker://{registry.host}/{REPO}:latest"
        creds = "reader:reader-secret"
        code, out, err = await skopeo(
            "inspect", "--raw", "--cert-dir", str(certs), "--creds", creds, ref, proxy=node.proxy_url
        )
        assert code == 0, err + node.log()
        assert out.encode() == image.manifest

        dest = tmp_path / "copied"
        code, out, err = await skopeo(
            "copy", "--src-cert-dir", str(certs), "--src-creds", creds, ref, f"dir:{dest}",
            proxy=node.proxy_url,
        )  # fmt: skip
        assert code == 0, err + node.log()
        for digest, layer in zip(image.layer_digests, layers, strict=True):
            assert (dest / digest.removeprefix("sha256:")).read_bytes() == layer
        assert json.loads((dest / "manifest.json").read_bytes()) == json.loads(image.manifest)
        # Every layer byte came from the registry through the default blob path.
        assert await registry.blob_get_count(image.layer_digests[0]) == 1
        expected = sum(len(layer) for layer in layers) + len(image_config_bytes(dest, image.config_digest))
        assert await node.metric("shoal_blob_bytes_total", source="upstream") == expected
        assert await node.metric("shoal_blob_bytes_total", source="p2p") == 0


def image_config_bytes(dest: Path, digest: str) -> bytes:
    return (dest / digest.removeprefix("sha256:")).read_bytes()
