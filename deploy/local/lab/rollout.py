"""Pull one image on every node of a lab at once, and account for it: per node the pull time, the
layer bytes by where they came from and the node's CPU; for the cluster the registry's egress.

    result = await roll_out(cluster, image, lambda node: node.pull(cluster.reference(image)))
    print(rollout_table(result))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lab.cluster import Cluster, Node
from lab.images import PushedImage

SOURCES = {"p2p": "peers", "upstream": "registry", "cache": "cache"}  # metric label -> column

Pull = Callable[[Node], Awaitable[object]]


@dataclass(frozen=True)
class NodePull:
    node: str
    seconds: float
    bytes: dict[str, float]  # by `SOURCES` label, this pull only; empty when not pulled through shoal
    cpu_seconds: float  # of the node's shoal-node during the rollout; 0 when not pulled through it


@dataclass(frozen=True)
class Rollout:
    image_bytes: int  # the layers' total size
    registry_bytes: int  # layer bytes the registry sent (its access log)
    pulls: list[NodePull]


def layer_bytes(image: PushedImage) -> int:
    return sum(layer["size"] for layer in json.loads(image.manifest)["layers"])


async def _served(node: Node) -> dict[str, float]:
    counters = await node.blob_bytes()
    return {source: counters.get(source, 0.0) for source in SOURCES}


async def _report_progress(nodes: list[Node], total: int, started: float, say: Callable[[str], None]) -> None:
    """A line every 2 s: each node's share of the layer bytes served so far."""
    baseline = {node.name: sum((await _served(node)).values()) for node in nodes}
    while True:
        await asyncio.sleep(2)
        shares = []
        for node in nodes:
            with contextlib.suppress(Exception):  # a node being killed or restarted mid-rollout
                done = sum((await _served(node)).values()) - baseline[node.name]
                shares.append(f"{node.name} {min(done / total, 1):4.0%}")
        say(f"  {time.monotonic() - started:6.1f} s   " + "   ".join(shares))


async def roll_out(
    cluster: Cluster,
    image: PushedImage,
    pull: Pull,
    *,
    through_node: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Rollout:
    """`pull(node)` on every node at once. With `through_node`, the node's counters and CPU are
    read before and after, and `progress` (if given) gets a line every 2 s."""
    nodes = cluster.nodes
    total = layer_bytes(image)
    before_bytes = {n.name: await _served(n) for n in nodes} if through_node else {}
    before_cpu = {n.name: n.cpu_seconds() for n in nodes} if through_node else {}
    started = time.monotonic()
    finished: dict[str, float] = {}

    async def timed(node: Node) -> None:
        await pull(node)
        finished[node.name] = time.monotonic() - started

    reporter = None
    if progress is not None and through_node:
        reporter = asyncio.create_task(_report_progress(nodes, total, started, progress))
    try:
        await asyncio.gather(*(timed(node) for node in nodes))
    finally:
        if reporter is not None:
            reporter.cancel()
    pulls = []
    for node in nodes:
        served: dict[str, float] = {}
        cpu = 0.0
        if through_node:
            after = await _served(node)
            served = {s: after[s] - before_bytes[node.name][s] for s in SOURCES}
            cpu = node.cpu_seconds() - before_cpu[node.name]
        pulls.append(NodePull(node.name, finished[node.name], served, cpu))
    registry_bytes = sum([await cluster.registry.blob_bytes_sent(d) for d in image.layer_digests])
    return Rollout(total, registry_bytes, pulls)


def megabytes(count: float) -> str:
    return f"{count / 1e6:,.1f} MB"


def rollout_table(rollout: Rollout) -> str:
    """Per node: pull time and bytes by source; then the registry's egress against the image."""
    header = ["node", "pull time", *(f"from {name}" for name in SOURCES.values()), "shoal-node CPU"]
    rows = [
        [
            p.node,
            f"{p.seconds:.1f} s",
            *(megabytes(p.bytes.get(s, 0)) for s in SOURCES),
            f"{p.cpu_seconds:.1f} s",
        ]
        for p in rollout.pulls
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    ratio = rollout.registry_bytes / rollout.image_bytes
    direct = len(rollout.pulls) * rollout.image_bytes
    egress, image = megabytes(rollout.registry_bytes), megabytes(rollout.image_bytes)
    lines.append(
        f"\nregistry egress: {egress} for {image} of layers ({ratio:.2f} x the image;"
        f" {len(rollout.pulls)} direct pulls would cost {megabytes(direct)})"
    )
    return "\n".join(lines)
