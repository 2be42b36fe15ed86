"""Cold rollout on the lab: N nodes pull an image of size S at once over links of rate B, through
shoal and straight from the registry, each with caches that have never seen the image.

Every host's link (the registry's included) is limited to B with `tc`, so S/B is the physical
limit of one node's pull, and of the registry sending the image once. The client is skopeo
(`copy docker://... dir:`), as dockerd would pull: through the node's proxy, or direct. Reported,
as a table and as JSON: per-node completion time p50/p99/max as a ratio to S/B, the registry's
egress (its access log) as a ratio to S, shoal-node CPU seconds per node, the machine's CPU use;
for the shoal run also when the registry finished sending (the origin phase) and how the rest was
spent. The completion-time CDF of both runs goes to a PNG.

    python3 tests/bench/rollout.py [--nodes 8] [--rate-mbit 200] [--size-mib 1024] [--layers 4]
                                   [--out bench-rollout]   # bench-rollout.json, bench-rollout.png

Needs root, the lab's packages (`bash deploy/local/install.sh bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))

from lab.cluster import Cluster, Node
from lab.images import PushedImage
from lab.procstat import machine_busy_seconds
from lab.rollout import Rollout, roll_out

MiB = 2**20


@dataclass(frozen=True)
class RunSummary:
    name: str
    completion_seconds: list[float]  # sorted
    p50: float  # ratios to S/B
    p99: float
    max: float
    registry_egress: float  # ratio to S
    node_cpu_seconds: float  # mean shoal-node CPU per node
    machine_cpu_busy: float  # fraction of all cores busy during the run
    registry_done_seconds: float | None  # shoal: when the last registry byte reached an origin


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


def registry_done(rollout: Rollout) -> float | None:
    """First sample time by which the nodes' registry bytes added up to the whole image."""
    by_time: dict[float, float] = {}
    for sample in rollout.timeline:
        by_time[sample.seconds] = by_time.get(sample.seconds, 0) + sample.bytes["upstream"]
    return next((t for t, sent in sorted(by_time.items()) if sent >= rollout.image_bytes), None)


async def run(
    cluster: Cluster, image: PushedImage, name: str, through_node: bool, limit: float
) -> tuple[RunSummary, Rollout]:
    reference = cluster.reference(image)

    async def pull(node: Node) -> None:
        await node.skopeo_copy(reference, through_node=through_node)

    def say(line: str) -> None:
        print(line, flush=True)

    print(f"\n{name}: {len(cluster.nodes)} nodes pull {reference} at once", flush=True)
    busy_before, started = machine_busy_seconds(), time.monotonic()
    rollout = await roll_out(
        cluster,
        image,
        pull,
        through_node=through_node,
        progress=say if through_node else None,
        sample_every=1,
    )
    busy = (machine_busy_seconds() - busy_before) / ((time.monotonic() - started) * (os.cpu_count() or 1))
    times = sorted(p.seconds for p in rollout.pulls)
    summary = RunSummary(
        name=name,
        completion_seconds=times,
        p50=percentile(times, 0.5) / limit,
        p99=percentile(times, 0.99) / limit,
        max=times[-1] / limit,
        registry_egress=rollout.registry_bytes / rollout.image_bytes,
        node_cpu_seconds=sum(p.cpu_seconds for p in rollout.pulls) / len(rollout.pulls),
        machine_cpu_busy=busy,
        registry_done_seconds=registry_done(rollout) if through_node else None,
    )
    return summary, rollout


def table(summaries: Sequence[RunSummary], limit: float) -> str:
    header = f"{'run':<8} {'p50':>6} {'p99':>6} {'max':>6} {'egress/S':>9} {'node CPU':>9} {'CPU busy':>9}"
    lines = [f"(times as a ratio to S/B = {limit:.1f} s; egress as a ratio to S)", header]
    for s in summaries:
        lines.append(
            f"{s.name:<8} {s.p50:6.2f} {s.p99:6.2f} {s.max:6.2f} {s.registry_egress:9.2f}"
            f" {s.node_cpu_seconds:8.1f}s {s.machine_cpu_busy:9.0%}"
        )
    return "\n".join(lines)


def draw_cdf(summaries: Sequence[RunSummary], limit: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        times = [t / limit for t in s.completion_seconds]
        fractions = [(i + 1) / len(times) for i in range(len(times))]
        axes.step([0, *times], [0, *fractions], where="post", label=s.name)
    axes.axvline(1.0, color="grey", linestyle="--", label="physical limit S/B")
    axes.set_xlabel("node completion time / (S/B)")
    axes.set_ylabel("fraction of nodes done")
    axes.set_title(title)
    axes.set_xlim(left=0)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


async def main(args: argparse.Namespace) -> None:
    size = args.size_mib * MiB
    layer_sizes = [size // args.layers] * args.layers
    limit = size * 8 / (args.rate_mbit * 1e6)  # S/B, seconds
    started = time.monotonic()
    lab = Cluster(args.nodes, rate=f"{args.rate_mbit}mbit", workdir=args.workdir, startup_timeout=120)
    async with lab as cluster:
        print(
            f"lab of {args.nodes} nodes up in {time.monotonic() - started:.0f} s; pushing two images",
            flush=True,
        )
        # Two images of the same shape: neither run finds anything of its image cached anywhere.
        images = [await cluster.push_image(f"bench/{name}", layer_sizes) for name in ("shoal", "direct")]
        shoal, shoal_rollout = await run(cluster, images[0], "shoal", True, limit)
        direct, _ = await run(cluster, images[1], "direct", False, limit)
    summaries = [shoal, direct]
    title = f"{args.nodes} nodes, {args.size_mib} MiB in {args.layers} layers, {args.rate_mbit} Mbit/s links"
    print(f"\n{title}\n{table(summaries, limit)}")
    if shoal.registry_done_seconds is not None:
        print(
            f"shoal: the registry had sent the image once after {shoal.registry_done_seconds:.0f} s"
            f" ({shoal.registry_done_seconds / limit:.2f} x S/B); the swarm did the rest"
        )
    out = Path(args.out)
    report = {
        "nodes": args.nodes, "rate_mbit": args.rate_mbit, "size_bytes": size, "layers": args.layers,
        "limit_seconds": limit, "runs": [asdict(s) for s in summaries],
        "shoal_timeline": [asdict(sample) for sample in shoal_rollout.timeline],
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    draw_cdf(summaries, limit, out.with_suffix(".png"), title)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rate-mbit", type=int, default=200)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", type=Path, help="keep the lab's logs here (default: removed)")
    parser.add_argument("--out", default="bench-rollout", help="path of the JSON and PNG, without suffix")
    asyncio.run(main(parser.parse_args()))
