"""Push images to the test registry over its HTTP API (docker v2 schema 2 manifests)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from lab.registry import Registry

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
IMAGE_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class PushedImage:
    repo: str
    tag: str
    manifest_digest: str
    layer_digests: list[str]
    config_digest: str
    manifest: bytes


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_layer(files: Mapping[str, tuple[bytes, int]]) -> bytes:
    """An uncompressed tar of these files (path -> (content, mode)), with fixed metadata."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (content, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = mode
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def random_bytes(rng: random.Random, size: int) -> bytes:
    """`rng.randbytes(size)` for any size (it overflows at 256 MiB), 64 MiB at a time."""
    part = 64 * 2**20
    return b"".join(rng.randbytes(min(part, size - offset)) for offset in range(0, size, part))


def random_tar_layer(size: int, seed: int, name: str = "blob.bin") -> bytes:
    """An uncompressed tar of one file of `size` random bytes; the same seed gives the same bytes."""
    return tar_layer({name: (random_bytes(random.Random(seed), size), 0o644)})


def image_config(layers: Sequence[bytes]) -> bytes:
    """Minimal image config: diff_ids are digests of the uncompressed layer tars."""
    diff_ids = [sha256_digest(gzip.decompress(b) if b.startswith(GZIP_MAGIC) else b) for b in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "shoal tests"} for _ in layers],
    }
    return json.dumps(config, separators=(",", ":")).encode()


def manifest_v2(config: bytes, layers: Sequence[bytes]) -> bytes:
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_V2,
        "config": {"mediaType": IMAGE_CONFIG, "size": len(config), "digest": sha256_digest(config)},
        "layers": [
            {
                "mediaType": LAYER_TAR_GZIP if layer.startswith(GZIP_MAGIC) else LAYER_TAR,
                "size": len(layer),
                "digest": sha256_digest(layer),
            }
            for layer in layers
        ],
    }
    return json.dumps(manifest, indent=3).encode()


async def _upload_blob(session: aiohttp.ClientSession, base: str, repo: str, data: bytes) -> str:
    digest = sha256_digest(data)
    async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as response:
        if response.status != 202:
            raise RuntimeError(f"start upload to {repo}: {response.status} {await response.text()}")
        location = response.headers["Location"]
    url = location if location.startswith("https://") else base + location
    sep = "&" if "?" in url else "?"
    headers = {"Content-Type": "application/octet-stream"}
    body = io.BytesIO(data)  # aiohttp warns (an error here) on large raw bytes bodies
    async with session.put(f"{url}{sep}digest={digest}", data=body, headers=headers) as response:
        if response.status != 201:
            raise RuntimeError(f"upload {digest} to {repo}: {response.status} {await response.text()}")
    return digest


async def push_image(
    registry: Registry, repo: str, layers: Sequence[bytes], tag: str = "latest"
) -> PushedImage:
    """Monolithic blob uploads, then the manifest. Layers starting with the gzip magic are pushed
    as `.tar.gzip` layers, others as plain `.tar`."""
    token = registry.issuer.token({repo: ["pull", "push"]}, subject="pusher")
    headers = {"Authorization": f"Bearer {token}"}
    config = image_config(layers)
    manifest = manifest_v2(config, layers)
    connector = aiohttp.TCPConnector(ssl=registry.ssl_context())
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        layer_digests = [await _upload_blob(session, registry.url, repo, layer) for layer in layers]
        config_digest = await _upload_blob(session, registry.url, repo, config)
        put = session.put(
            f"{registry.url}/v2/{repo}/manifests/{tag}", data=manifest, headers={"Content-Type": MANIFEST_V2}
        )
        async with put as response:
            if response.status != 201:
                raise RuntimeError(f"put manifest {repo}:{tag}: {response.status} {await response.text()}")
            manifest_digest = response.headers["Docker-Content-Digest"]
    if manifest_digest != sha256_digest(manifest):
        raise RuntimeError(f"registry says manifest is {manifest_digest}, we sent {sha256_digest(manifest)}")
    return PushedImage(repo, tag, manifest_digest, layer_digests, config_digest, manifest)
