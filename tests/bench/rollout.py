"""Cold rollout on the lab: an image of size S over links of rate B, pulled by one node alone
straight from the registry (T1, the baseline the team's target is stated against), then by all N
nodes at once through shoal, then by all N at once straight from the registry. Each run pulls an
image of its own (same shape, freshly pushed), so no cache anywhere has seen it.

Every host's link (the registry's included) is limited to B with `tc`, so S/B is the physical
limit of one node's pull, and of the registry sending the image once. The client is skopeo
(`copy docker://... oci:`), as dockerd would pull: through the node's proxy, or direct. Reported
per run, as a markdown table (README-ready) and as JSON: per-node completion p50/p99/max as
ratios to T1 and to S/B, the registry's egress (its access log) as a ratio to S, tracker requests
per node, shoal-node CPU seconds per GiB pulled (mean and max over nodes), the machine's CPU busy
(a run at >= 85 % is marked CPU-bound: its times say more about this machine than about shoal).
For the shoal run also when the registry had sent the image once, and `overlap`: the share of
peer bytes received before then (swarm and registry at work together, not one after the other).
Completion-time CDFs go to `<out>.png`; the shoal run's bytes from registry and peers over time
to `<out>-timeline.png`.

    python3 tests/bench/rollout.py [--nodes 8] [--rate-mbit 200] [--size-mib 1024]
                                   [--layers 4 | --layers 1 | --layers 512MiB,256MiB,256MiB]
                                   [--chunk-size 32MiB] [--chunks-in-flight 2]
                                   [--origin-connections 2] [--no-direct] [--out bench-rollout]

`--no-direct` skips the N direct pulls: they take N x S/B (the registry's link carries N copies),
which at N = 16 is over ten minutes of a run that says nothing new about shoal.

Needs root, the lab's packages (`bash deploy/local/install.sh bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common.config import parse_size

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))

from lab.cluster import Cluster, Node
from lab.images import PushedImage
from lab.procstat import machine_busy_seconds
from lab.rollout import Rollout, roll_out
from lab.services import https_context, metric_value, metrics_text

MiB, GiB = 2**20, 2**30
CPU_BOUND = 0.85  # machine CPU busy from which a run measures this machine more than shoal
TRACKER_REQUESTS = (
    "shoal_tracker_joins_total",
    "shoal_tracker_syncs_total",
    "shoal_tracker_announces_total",
    "shoal_tracker_torrents_published_total",
)


@dataclass(frozen=True)
class RunSummary:
    name: str
    completion_seconds: list[float]  # sorted
    vs_t1: dict[str, float]  # p50, p99, max of the completion times as ratios to T1
    vs_limit: dict[str, float]  # the same as ratios to S/B
    registry_egress: float  # ratio to S
    tracker_requests_per_node: float | None  # shoal only
    node_cpu_per_gib: float | None  # shoal-node CPU seconds per GiB it served, mean over nodes
    node_cpu_per_gib_max: float | None
    machine_cpu_busy: float  # fraction of all cores busy during the run
    cpu_bound: bool


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


def layer_layout(text: str, size: int) -> list[int]:
    """`4`: four equal layers making up `size`; `1GiB` or `512MiB,256MiB,256MiB`: these sizes."""
    if text.isdigit():
        return [size // int(text)] * int(text)
    return [parse_size(part) for part in text.split(",")]


def cumulative(rollout: Rollout, source: str) -> list[tuple[float, float]]:
    """(seconds, bytes from `source` summed over nodes) from (0, 0), at every sample (a node
    missing from one counted at its last value), to the final counts when the last node finished."""
    latest: dict[str, float] = {}
    points = [(0.0, 0.0)]
    for seconds, samples in itertools.groupby(rollout.timeline, key=lambda sample: sample.seconds):
        latest |= {sample.node: sample.bytes[source] for sample in samples}
        points.append((seconds, sum(latest.values())))
    end = max(pull.seconds for pull in rollout.pulls)
    return [*points, (end, sum(pull.bytes[source] for pull in rollout.pulls))]


def registry_done(rollout: Rollout) -> float | None:
    """When the nodes' registry bytes added up to the whole image (interpolated between samples)."""
    points = cumulative(rollout, "upstream")
    for (t0, b0), (t1, b1) in itertools.pairwise(points):
        if b1 >= rollout.image_bytes:
            return t0 + (t1 - t0) * (rollout.image_bytes - b0) / (b1 - b0)
    return None


def overlap(rollout: Rollout) -> float | None:
    """Share of all peer bytes received by the time the registry had sent the image once."""
    done, p2p = registry_done(rollout), cumulative(rollout, "p2p")
    if done is None or p2p[-1][1] == 0:
        return None
    (t0, b0), (t1, b1) = next(pair for pair in itertools.pairwise(p2p) if pair[1][0] >= done)
    received = b1 if t1 == t0 else b0 + (b1 - b0) * (done - t0) / (t1 - t0)
    return received / p2p[-1][1]


async def tracker_requests(cluster: Cluster) -> float:
    """Requests the tracker has answered so far: joins, syncs, announces and chunk publishes (the
    origins' progress reports, a few per chunk, have no counter)."""
    text = await metrics_text(cluster.tracker_url, https_context(cluster.ca_file))
    return sum(metric_value(text, name) or 0.0 for name in TRACKER_REQUESTS)


async def run(
    cluster: Cluster, image: PushedImage, name: str, through_node: bool, nodes: Sequence[Node]
) -> tuple[Rollout, float]:
    """The rollout of `image` on `nodes`, and the machine's CPU busy meanwhile."""
    reference = cluster.reference(image)

    async def pull(node: Node) -> None:
        await node.skopeo_copy(reference, through_node=through_node)

    def say(line: str) -> None:
        print(line, flush=True)

    print(f"\n{name}: {len(nodes)} node(s) pull {reference} at once", flush=True)
    busy_before, started = machine_busy_seconds(), time.monotonic()
    rollout = await roll_out(
        cluster, image, pull, through_node=through_node, progress=say if through_node else None,
        sample_every=1, nodes=nodes,
    )  # fmt: skip
    busy = (machine_busy_seconds() - busy_before) / ((time.monotonic() - started) * (os.cpu_count() or 1))
    return rollout, busy


def summarize(
    name: str, rollout: Rollout, busy: float, t1: float, limit: float, requests: float | None
) -> RunSummary:
    times = sorted(p.seconds for p in rollout.pulls)
    marks = {"p50": percentile(times, 0.5), "p99": percentile(times, 0.99), "max": times[-1]}
    per_gib = [p.cpu_seconds / (sum(p.bytes.values()) / GiB) for p in rollout.pulls if sum(p.bytes.values())]
    return RunSummary(
        name=name,
        completion_seconds=times,
        vs_t1={mark: seconds / t1 for mark, seconds in marks.items()},
        vs_limit={mark: seconds / limit for mark, seconds in marks.items()},
        registry_egress=rollout.registry_bytes / rollout.image_bytes,
        tracker_requests_per_node=None if requests is None else requests / len(rollout.pulls),
        node_cpu_per_gib=statistics.mean(per_gib) if per_gib else None,
        node_cpu_per_gib_max=max(per_gib) if per_gib else None,
        machine_cpu_busy=busy,
        cpu_bound=busy >= CPU_BOUND,
    )


MARKDOWN_HEADER = (
    "| run | N | S | layers | B | chunk | p50/T1 | p99/T1 | max/T1 | p50/(S/B) | p99/(S/B) | max/(S/B)"
    " | egress/S | tracker req/node | node CPU s/GiB mean, max | CPU busy |"
)


def markdown_row(s: RunSummary, setup: Sequence[str]) -> str:
    def number(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    cpu = f"{number(s.node_cpu_per_gib, '.1f')}, {number(s.node_cpu_per_gib_max, '.1f')}"
    busy = f"{s.machine_cpu_busy:.0%}" + (" CPU-bound" if s.cpu_bound else "")
    cells = [
        s.name, str(len(s.completion_seconds)), *setup, *(number(s.vs_t1[m]) for m in ("p50", "p99", "max")),
        *(number(s.vs_limit[m]) for m in ("p50", "p99", "max")), number(s.registry_egress),
        number(s.tracker_requests_per_node, ".0f"), "-" if s.node_cpu_per_gib is None else cpu, busy,
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


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
    axes.set_title(title, fontsize=9)
    axes.set_xlim(left=0)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def draw_timeline(rollout: Rollout, path: Path, title: str) -> None:
    """Bytes from the registry and from peers, summed over nodes, in multiples of S: whether the
    swarm's bytes flow while the registry's still do, or only after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for source, label in (("upstream", "from the registry"), ("p2p", "from peers")):
        points = cumulative(rollout, source)
        axes.plot([t for t, _ in points], [b / rollout.image_bytes for _, b in points], label=label)
    done = registry_done(rollout)
    if done is not None:
        axes.axvline(done, color="grey", linestyle="--", label="registry has sent S once")
    axes.set_xlabel("seconds since the pulls started")
    axes.set_ylabel("bytes received, summed over nodes / S")
    axes.set_title(f"shoal: {title}", fontsize=9)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


async def main(args: argparse.Namespace) -> None:
    layer_sizes = layer_layout(args.layers, args.size_mib * MiB)
    size = sum(layer_sizes)
    limit = size * 8 / (args.rate_mbit * 1e6)  # S/B, seconds
    tracker_options: dict[str, object] = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    if args.chunks_in_flight:
        tracker_options["chunks_in_flight"] = args.chunks_in_flight
    node_options = {"origin_connections": args.origin_connections} if args.origin_connections else {}
    started = time.monotonic()
    lab = Cluster(
        args.nodes, rate=f"{args.rate_mbit}mbit", workdir=args.workdir, startup_timeout=120,
        tracker_options=tracker_options, node_options=node_options,
    )  # fmt: skip
    async with lab as cluster:
        print(
            f"lab of {args.nodes} nodes up in {time.monotonic() - started:.0f} s; pushing three images",
            flush=True,
        )
        images = {
            name: await cluster.push_image(f"bench/{name}", layer_sizes) for name in ("t1", "shoal", "direct")
        }
        t1_rollout, t1_busy = await run(cluster, images["t1"], "T1", False, cluster.nodes[:1])
        t1 = t1_rollout.pulls[0].seconds
        requests_before = await tracker_requests(cluster)
        shoal_rollout, shoal_busy = await run(cluster, images["shoal"], "shoal", True, cluster.nodes)
        requests = await tracker_requests(cluster) - requests_before
        summaries = [
            summarize("T1", t1_rollout, t1_busy, t1, limit, None),
            summarize("shoal", shoal_rollout, shoal_busy, t1, limit, requests),
        ]
        if not args.no_direct:
            direct_rollout, direct_busy = await run(cluster, images["direct"], "direct", False, cluster.nodes)
            summaries.append(summarize("direct", direct_rollout, direct_busy, t1, limit, None))
    layout = f"{len(layer_sizes)} layer(s) of {', '.join(f'{s / MiB:g}' for s in layer_sizes)} MiB"
    chunk = args.chunk_size or "default"
    title = (
        f"{args.nodes} nodes, {size / MiB:g} MiB in {layout}, {args.rate_mbit} Mbit/s links, chunk {chunk}"
    )
    setup = [f"{size / MiB:g} MiB", str(len(layer_sizes)), f"{args.rate_mbit} Mbit/s", chunk]
    done, shared = registry_done(shoal_rollout), overlap(shoal_rollout)
    print(f"\n{title}\nT1 = {t1:.1f} s; S/B = {limit:.1f} s; egress as a ratio to S\n")
    print("\n".join([MARKDOWN_HEADER, "|---" * MARKDOWN_HEADER.count(" | ") + "|---|"]))
    print("\n".join(markdown_row(s, setup) for s in summaries))
    if done is not None and shared is not None:
        print(
            f"\nshoal: the registry had sent the image once after {done:.0f} s ({done / limit:.2f} x S/B);"
            f" overlap = {shared:.2f} (the share of peer bytes received by then)"
        )
    out = Path(args.out)
    report = {
        "nodes": args.nodes, "rate_mbit": args.rate_mbit, "size_bytes": size, "layer_bytes": layer_sizes,
        "chunk_size": args.chunk_size, "limit_seconds": limit, "t1_seconds": t1,
        "registry_done_seconds": done, "overlap": shared, "runs": [asdict(s) for s in summaries],
        "shoal_timeline": [asdict(sample) for sample in shoal_rollout.timeline],
    }  # fmt: skip
    timeline_png = out.with_name(f"{out.name}-timeline.png")
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    draw_cdf(summaries, limit, out.with_suffix(".png"), title)
    draw_timeline(shoal_rollout, timeline_png, title)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.png')} and {timeline_png}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rate-mbit", type=int, default=200)
    parser.add_argument("--size-mib", type=int, default=1024, help="S, unless --layers gives sizes")
    parser.add_argument(
        "--layers", "--image-layers", default="4",
        help="a count of equal layers making up S (4; 1 for one layer), or sizes: 512MiB,256MiB,256MiB",
    )  # fmt: skip
    parser.add_argument("--chunk-size", help="the tracker's chunk_size, e.g. 32MiB (default: its own)")
    parser.add_argument("--chunks-in-flight", type=int, help="the tracker's chunks_in_flight (default 2)")
    parser.add_argument("--origin-connections", type=int, help="the nodes' origin_connections (default 2)")
    parser.add_argument(
        "--no-direct", action="store_true", help="skip the N direct pulls (quicker, while tuning shoal)"
    )
    parser.add_argument("--workdir", type=Path, help="keep the lab's logs here (default: removed)")
    parser.add_argument("--out", default="bench-rollout", help="path of the JSON and PNGs, without suffix")
    asyncio.run(main(parser.parse_args()))
