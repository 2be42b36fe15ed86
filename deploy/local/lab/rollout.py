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
from collections.abc import Awaitable, Callable, Sequence
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
class Sample:
    seconds: float  # since the pulls started
    node: str
    bytes: dict[str, float]  # served so far in this rollout, by `SOURCES` label


@dataclass(frozen=True)
class Rollout:
    image_bytes: int  # the layers' total size
    registry_bytes: int  # layer bytes the registry sent (its access log)
    pulls: list[NodePull]
    timeline: list[Sample]  # every node's counters, sampled while the pulls ran


def layer_bytes(image: PushedImage) -> int:
    return sum(layer["size"] for layer in json.loads(image.manifest)["layers"])


def _since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {source: after[source] - before[source] for source in SOURCES}


async def _sample(
    nodes: list[Node],
    before: dict[str, dict[str, float]],
    total: int,
    started: float,
    every: float,
    timeline: list[Sample],
    say: Callable[[str], None] | None,
) -> None:
    """Every `every` seconds: each node's counters into `timeline`, and a progress line to `say`
    (each node's share of the image's layer bytes)."""
    while True:
        await asyncio.sleep(every)
        now = time.monotonic() - started
        shares = []
        for node in nodes:
            with contextlib.suppress(Exception):  # a node being killed or restarted mid-rollout
                sample = Sample(now, node.name, _since(before[node.name], await node.blob_bytes()))
                timeline.append(sample)
                shares.append(f"{node.name} {min(sum(sample.bytes.values()) / total, 1):4.0%}")
        if say is not None:
            say(f"  {now:6.1f} s   " + "   ".join(shares))


async def roll_out(
    cluster: Cluster,
    image: PushedImage,
    pull: Pull,
    *,
    through_node: bool = True,
    progress: Callable[[str], None] | None = None,
    sample_every: float = 2.0,
    nodes: Sequence[Node] | None = None,
) -> Rollout:
    """`pull(node)` on every node at once (or on `nodes` only, e.g. one node alone). With
    `through_node`, each node's counters are sampled every `sample_every` seconds (a line to
    `progress`, if given), and its CPU read before and after."""
    nodes = list(cluster.nodes if nodes is None else nodes)
    total = layer_bytes(image)
    before = {n.name: await n.blob_bytes() for n in nodes} if through_node else {}
    before_cpu = {n.name: n.cpu_seconds() for n in nodes} if through_node else {}
    started = time.monotonic()
    finished: dict[str, float] = {}
    timeline: list[Sample] = []

    async def timed(node: Node) -> None:
        await pull(node)
        finished[node.name] = time.monotonic() - started

    sampler = None
    if through_node:
        sampler = asyncio.create_task(
            _sample(nodes, before, total, started, sample_every, timeline, progress)
        )
    try:
        await asyncio.gather(*(timed(node) for node in nodes))
    finally:
        if sampler is not None:
            sampler.cancel()
    pulls = []
    for node in nodes:
        served = _since(before[node.name], await node.blob_bytes()) if through_node else {}
        cpu = node.cpu_seconds() - before_cpu[node.name] if through_node else 0.0
        pulls.append(NodePull(node.name, finished[node.name], served, cpu))
    registry_bytes = sum([await cluster.registry.blob_bytes_sent(d) for d in image.layer_digests])
    return Rollout(total, registry_bytes, pulls, timeline)


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
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
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
