"""The README demo: a lab of N nodes, an image of three ~100 MB layers pushed to its registry,
`docker pull` on every node at once through shoal, a table of where the bytes came from, the
slowest node against one node pulling an image of the same size alone straight from the
registry (measured first, in the same lab), and a container run from the image.

    python3 -m lab demo [--nodes 3] [--rate 200mbit] [--layer-mb 100]
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from lab.cluster import Cluster
from lab.images import PushedImage, push_image, random_bytes, tar_layer
from lab.rollout import megabytes, roll_out, rollout_table

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary, so containers can run
REPO = "demo/app"
LAYERS = 3


def say(line: str) -> None:
    print(line, flush=True)


def demo_layers(layer_bytes: int, seed: int) -> list[bytes]:
    """Three layers of random data (so nothing compresses or deduplicates), the first with busybox."""
    if not BUSYBOX.is_file():
        raise SystemExit(
            f"{BUSYBOX} is missing: apt-get install busybox-static (the demo runs a command from it)"
        )
    rng = random.Random(seed)
    layers = []
    for i in range(1, LAYERS + 1):
        files = {f"data/layer-{i}.bin": (random_bytes(rng, layer_bytes), 0o644)}
        if i == 1:
            files["bin/busybox"] = (BUSYBOX.read_bytes(), 0o755)
        layers.append(tar_layer(files))
    return layers


async def push_demo_image(cluster: Cluster, layer_bytes: int, tag: str) -> PushedImage:
    layers = await asyncio.to_thread(demo_layers, layer_bytes, time.time_ns())
    return await push_image(cluster.registry, REPO, layers, tag=tag)


async def pull_alone_direct(cluster: Cluster, reference: str) -> float:
    """Seconds node-1's dockerd takes to pull `reference` alone, straight from the registry (its
    dockerd restarted without the proxy, then again through its shoal-node)."""
    await cluster.restart_dockerd(0, through_node=False)
    try:
        started = time.monotonic()
        await cluster.nodes[0].pull(reference)
        return time.monotonic() - started
    finally:
        await cluster.restart_dockerd(0, through_node=True)


async def demo(nodes: int, rate: str | None, layer_mb: int, workdir: Path | None) -> None:
    say(f"starting a lab: registry, token realm, tracker and {nodes} nodes (shoal-node + dockerd each),"
        f" links limited to {rate or 'nothing'}")  # fmt: skip
    started = time.monotonic()
    async with Cluster(nodes, rate=rate, workdir=workdir) as cluster:
        say(f"lab up in {time.monotonic() - started:.1f} s (work dir {cluster.workdir})")
        image = await push_demo_image(cluster, layer_mb * 1_000_000, "latest")
        baseline = await push_demo_image(cluster, layer_mb * 1_000_000, "baseline")
        reference = cluster.reference(image)
        say(f"pushed {reference} and :baseline, each {LAYERS} layers of random data, the first with busybox")
        first = cluster.nodes[0].name
        say(f"\ndocker pull of :baseline on {first} alone, straight from the registry (no shoal) ...")
        alone = await pull_alone_direct(cluster, cluster.reference(baseline))
        say(f"  {alone:.1f} s")
        say(f"\ndocker pull on all {nodes} nodes at once (share of the layers each node has received):")
        result = await roll_out(cluster, image, lambda node: node.pull(reference), progress=say)
        say("\n" + rollout_table(result))
        slowest = max(result.pulls, key=lambda pull: pull.seconds)
        say(
            f"slowest node: {slowest.node} {slowest.seconds:.1f} s = {slowest.seconds / alone:.2f} x one node"
            f" pulling alone straight from the registry ({alone:.1f} s, {first}, same run)\n"
        )
        for node in cluster.nodes:
            image_id = await node.image_id(reference)
            if image_id != image.config_digest:
                raise SystemExit(f"{node.name}: image id {image_id}, pushed {image.config_digest}")
        say(f"every node's dockerd has image {image.config_digest[:19]}")
        script = "echo hello from a container on $(hostname); du -sh /data/*"
        code, out = await cluster.nodes[0].docker(
            "run", "--rm", "--network", "none", "--hostname", cluster.nodes[0].name, reference,
            "/bin/busybox", "sh", "-c", script,
        )  # fmt: skip
        if code != 0:
            raise SystemExit(f"docker run on {cluster.nodes[0].name} failed:\n{out}")
        say(
            f"\n$ docker run --rm {reference} sh -c '{script}'   (on {cluster.nodes[0].name})\n{out.rstrip()}"
        )
        egress = megabytes(result.registry_bytes)
        say(f"\nthe registry sent {egress}; each node pulled {megabytes(result.image_bytes)} of layers")
    say("lab stopped and removed")
